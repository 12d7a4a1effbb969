"""Stand-in webui for the A1111 host tests (see README.md)."""
