"""Drive the real hosts (ComfyUI, AUTOMATIC1111/Forge) in headless Chromium, as a user would: helpers and page
drivers for tests/test_browser_comfyui.py and tests/test_browser_webui.py (see README.md beside this file)."""
