"""Stand-in for the `modules` package of AUTOMATIC1111 stable-diffusion-webui v1.10.1 (see ../../README.md)."""
