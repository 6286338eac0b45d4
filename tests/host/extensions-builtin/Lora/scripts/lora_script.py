"""The built-in Lora extension's script (extensions-builtin/Lora/scripts/lora_script.py): patches the
layers at import, names the model's layers on every `model_loaded`, registers `<lora:...>` (and its
`lyco` alias) before the UI is built, undoes the patches when scripts are unloaded.

Not reproduced: the extra-networks Lora page, the `/sdapi/v1/loras` routes, and the infotext-paste
handlers (AddNet fields, `Lora hashes` alias fixing)."""

import extra_networks_lora
import lora  # noqa: F401
import lora_patches
import networks

from modules import extra_networks, script_callbacks, shared


def unload():
    networks.originals.undo()


def before_ui():
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)

# the extension's settings (their defaults; known to opts but not in its data until set)
shared.opts.data_labels.update({
    "sd_lora": "None",
    "lora_preferred_name": "Alias from file",
    "lora_add_hashes_to_infotext": True,
    "lora_bundled_ti_to_infotext": True,
    "lora_show_all": False,
    "lora_hide_unknown_for_versions": [],
    "lora_in_memory_limit": 0,
    "lora_not_found_warning_console": False,
    "lora_not_found_gradio_warning": False,
    "lora_functional": False,
})
