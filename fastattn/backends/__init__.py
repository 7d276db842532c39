"""Backends of `fastattn.spatial_attention`; see fastattn.dispatch for how one is chosen."""
