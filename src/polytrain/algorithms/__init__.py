"""Training objectives: each a pure loss function of (model, batch) plus its config."""
