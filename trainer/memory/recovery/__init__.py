"""At run time: the OOM ladder (`ladder`), the levers it pulls (`levers`) and spill detection (`spill`)."""
