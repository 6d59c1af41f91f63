"""ponder's model: GPT-2 in Flax NNX, the TTT layer and its gate, tokenizers, checkpoints, HF interop.

Importing it changes nothing in the process; the XLA flags and malloc settings
the server and training want are applied by their entry points
(``ponder.runtime.configure_process``).
"""
