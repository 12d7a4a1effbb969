"""The host-agnostic training engine. Imports no host code, ever."""
