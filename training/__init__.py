"""DFM model, probability paths, samplers and the trainer loop (issue 5)."""
