"""unipic: the Skywork UniPic family of unified multimodal models, installable and tested."""

__version__ = "0.1.0"
