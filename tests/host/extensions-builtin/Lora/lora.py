"""Old names of the Lora extension's lists (extensions-builtin/Lora/lora.py)."""

import networks

list_available_loras = networks.list_available_networks

available_loras = networks.available_networks
available_lora_aliases = networks.available_network_aliases
available_lora_hash_lookup = networks.available_network_hash_lookup
forbidden_lora_aliases = networks.forbidden_network_aliases
loaded_loras = networks.loaded_networks
