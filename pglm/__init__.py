"""pglm: policy-gradient language models, from raw text to a model tuned by policy gradient."""

__version__ = "0.1.0"
