"""Tokenizers: unified vocabulary, BPE text, image/video/audio VQ tokenizers (issue 3)."""
