"""agent-gateway: the Runtime Session Gateway (the trio shell around `statemachine`)."""
