"""The catalog build on Ray (``ray_build``): a workstation or cluster tool beside the device, never imported by
it. ``python -m device index build --ray [ADDRESS]`` loads it by name; ``pip install '.[scale]'`` installs Ray."""
