"""Whetstone's ML side: LoRA, base-model loading and the built-in model's generation.

Everything here imports torch (and transformers), so only the trainer and the sampler import this
package; the control plane (gateway, scheduler, billing, the CLI) sticks to the torch-free
contract package ``whetstone``. ``whetstone up`` generates the built-in model through
``python -m whetstone_ml.builtin`` in a child process for the same reason.
"""
