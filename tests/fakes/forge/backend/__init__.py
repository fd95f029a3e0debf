"""Test double of Forge 2.x ``backend`` (only the parts an attention extension touches).

Written from the documented behaviour of lllyasviel/stable-diffusion-webui-forge (``backend/`` era); no
code is copied.  The UNet is the real tiny ldm UNet of ``tests.support.tiny`` whose modules are switched
to Forge-style subclasses (``backend.nn.unet.forgeify``) so that ``transformer_options`` flow through them.
"""
