"""`python -m gateway` is `agent-gateway`."""

from gateway.cli import main

raise SystemExit(main())
