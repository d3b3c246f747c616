"""Where and how the suite runs: devices and CPUs, torchrun's process layout and process group (with the
gloo shim that lets kronfluence run on CPUs), and the command-line conventions every script shares
(one-line errors, argument types, logging)."""
