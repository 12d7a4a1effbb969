"""Model bundles: one builder per source of models (diffusers components, a checkpoint file, the tiny test model)."""
