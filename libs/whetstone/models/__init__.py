"""Base models as the control plane sees them: the registry and the built-in model's identity.

Torch-free by design (the gateway, scheduler and billing import it); loading and generating
models is ``whetstone_ml``'s job, on the trainer and sampler only.
"""
