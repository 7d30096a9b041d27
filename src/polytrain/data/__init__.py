"""Data: conversation files, chat templates, tokenisation, packing and the resumable sample order."""
