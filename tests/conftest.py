"""Hypothesis profiles: no deadlines anywhere (timing belongs in bench/), fewer examples in CI."""

import os

from hypothesis import settings

# Deadlines make property tests flaky on loaded machines; speed is measured in bench/ instead.
settings.register_profile("dev", deadline=None)
# CI runs the suite on three interpreters within its time budget, so each property gets fewer
# (still random) examples; a failure prints the blob that reproduces it.
settings.register_profile("ci", deadline=None, max_examples=50, print_blob=True)
_default_profile = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _default_profile)
