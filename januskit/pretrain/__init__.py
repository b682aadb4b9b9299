"""Training the parts Janus starts from, from nothing: tokenizer, VQ tokenizer, SigLIP encoder, text LLM.

Released Janus models start from DeepSeek-LLM, SigLIP and LlamaGen's VQ-16; januskit's bundled model trains
small analogues of each on the shapes world (`chain.py` runs everything, then stages I-III with the trainer).
"""
