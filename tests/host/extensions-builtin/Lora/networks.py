"""The built-in Lora extension's core (extensions-builtin/Lora/networks.py), for SD1 and SDXL.

Files in `--lora-dir` (and `--lyco-dir-backcompat`) are networks named after the file (or the alias
in their `ss_output_name` metadata). A network's keys are resolved to the live model's layers as the
host does for SD1: kohya's diffusers spelling (`lora_unet_down_blocks_0_attentions_0_...`,
`lora_te_text_model_encoder_layers_0_...`) through `convert_diffusers_name_to_compvis`, ldm spelling
(`lora_unet_input_blocks_1_1_...`), `lora_te1_text_model_...`; keys that match no layer are
ignored (logged at DEBUG only).

As in the host, weights change lazily: `load_networks` only sets the list of loaded networks; each
Linear / Conv2d / GroupNorm / LayerNorm of the model, at its next forward, compares the networks
applied to it with that list and, when they differ, restores its original weight (backed up the
first time) and adds every loaded network's difference. So weights stay changed until the set of
networks (names and multipliers) changes, and a generation without `<lora:...>` restores them.

Not reproduced (see tests/host/README.md): the functional `lora_functional` mode (refused), IA3,
Norm, GLoRA and OFT modules (a file needing them fails to load), bundled embeddings (`bundle_emb.*`:
the file fails to load).

SDXL: text layers are named per embedder (`0_transformer_text_model_...` for CLIP-L,
`1_model_transformer_resblocks_N_...` for OpenCLIP bigG); `lora_te2_` keys convert to the latter
(mlp_fc1 -> mlp_c_fc, mlp_fc2 -> mlp_c_proj, self_attn -> attn), so q/k/v resolve through
`re_x_proj` to the block's MultiheadAttention while out_proj is its own Linear (whose forward
MultiheadAttention never calls); the MultiheadAttention's patched forward applies q, k, v (to
`in_proj_weight`) and out (to `out_proj`) only when a network has all four for it.
"""

from __future__ import annotations

import logging
import os
import re

import lora_patches
import network
import network_full
import network_hada
import network_lokr
import network_lora
import torch

from modules import devices, errors, sd_hijack, sd_models, shared

module_types = [
    network_lora.ModuleTypeLora(),
    network_hada.ModuleTypeHada(),
    network_lokr.ModuleTypeLokr(),
    network_full.ModuleTypeFull(),
]

re_digits = re.compile(r"\d+")
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")

suffix_conversion = {
    "attentions": {},
    "resnets": {
        "conv1": "in_layers_2",
        "conv2": "out_layers_3",
        "norm1": "in_layers_0",
        "norm2": "out_layers_0",
        "time_emb_proj": "emb_layers_1",
        "conv_shortcut": "skip_connection",
    },
}


def convert_diffusers_name_to_compvis(key, is_sd2):
    """A kohya (diffusers-spelled) key stem -> the name of an ldm layer (dots as `_`); other stems
    come back unchanged."""

    def match(pattern):
        m = re.match(pattern, key)
        if not m:
            return None
        return [int(x) if re.match(re_digits, x) else x for x in m.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    """Every module of the text encoder (below the hijack's `wrapped`) and of `model` gets
    `network_layer_name`, its dotted name with `_`; the map goes to `sd_model.network_layer_mapping`.
    SDXL: each hijacked embedder's wrapped module, its names prefixed with the embedder's index
    (`0_transformer_text_model_...`, `1_model_transformer_resblocks_...`); embedders without
    `wrapped` (the size embedders) are skipped."""
    mapping = {}
    if shared.sd_model.is_sdxl:
        for i, embedder in enumerate(shared.sd_model.conditioner.embedders):
            if not hasattr(embedder, "wrapped"):
                continue
            for name, module in embedder.wrapped.named_modules():
                network_name = f'{i}_{name.replace(".", "_")}'
                mapping[network_name] = module
                module.network_layer_name = network_name
        roots = (shared.sd_model.model,)
    else:
        roots = (getattr(shared.sd_model.cond_stage_model, "wrapped", shared.sd_model.cond_stage_model),
                 shared.sd_model.model)
    for root in roots:
        for name, module in root.named_modules():
            network_name = name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = sd_models.read_state_dict(network_on_disk.filename)
    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)
    mapping = shared.sd_model.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping

    keys_failed_to_match = {}
    matched_networks = {}
    for key_network, weight in sd.items():
        stem, _, network_part = key_network.partition(".")
        if stem == "bundle_emb":
            raise NotImplementedError("the test double does not load embeddings bundled in a Lora file")
        key = convert_diffusers_name_to_compvis(stem, is_sd2)
        sd_module = mapping.get(key)
        if sd_module is None and (m := re_x_proj.match(key)):
            sd_module = mapping.get(m.group(1))
        # SDXL (and some SD1) files already spell ldm names
        if sd_module is None and "lora_unet" in stem:
            key = stem.replace("lora_unet", "diffusion_model")
            sd_module = mapping.get(key)
        elif sd_module is None and "lora_te1_text_model" in stem:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key)
            if sd_module is None:
                key = stem.replace("lora_te1_text_model", "transformer_text_model")
                sd_module = mapping.get(key)
        elif sd_module is None and "oft_unet" in stem:
            key = stem.replace("oft_unet", "diffusion_model")
            sd_module = mapping.get(key)
        if sd_module is None and "oft_diag" in key:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key)
        if sd_module is None:
            keys_failed_to_match[key_network] = key
            continue
        if key not in matched_networks:
            matched_networks[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={},
                                                           sd_module=sd_module)
        matched_networks[key].w[network_part] = weight

    for key, weights in matched_networks.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break
        if net_module is None:
            raise AssertionError(f"Could not find a module type (out of "
                                 f"{', '.join(x.__class__.__name__ for x in module_types)}) that would accept "
                                 f"those keys: {', '.join(weights.w)}")
        net.modules[key] = net_module

    if keys_failed_to_match:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {keys_failed_to_match}")
    return net


def purge_networks_from_memory():
    while len(networks_in_memory) > shared.opts.lora_in_memory_limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)))


def _lookup(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    """Make `names` (with their multipliers) the loaded networks. A network already loaded is kept
    unless its file is newer; others are read from disk. Missing names are reported as a comment
    (`Lora not found: ...`), a file that fails to load is reported and skipped."""
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()

    unavailable = [name for name in names if _lookup(name) is None]
    if unavailable:
        update_available_networks_by_names(unavailable)
    networks_on_disk = [_lookup(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [_lookup(name) for name in names]

    failed_to_load_networks = []
    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        net = already_loaded.get(name)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue
            net.mentioned_name = name
            network_on_disk.read_hash()
        if net is None:
            failed_to_load_networks.append(name)
            logging.info(f"Couldn't find network with name {name}")
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)

    if failed_to_load_networks:
        message = f'Lora not found: {", ".join(failed_to_load_networks)}'
        sd_hijack.model_hijack.comments.append(message)
        if shared.opts.lora_not_found_warning_console:
            print(f"\n{message}\n")
        if shared.opts.lora_not_found_gradio_warning:
            import gradio as gr

            gr.Warning(message)
    purge_networks_from_memory()


def allowed_layer_without_weight(layer):
    return isinstance(layer, torch.nn.LayerNorm) and not layer.elementwise_affine


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if isinstance(self, torch.nn.MultiheadAttention):
        if weights_backup is not None:
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        restore_weights_backup(self.out_proj, "bias", bias_backup)
        return
    if weights_backup is not None:
        restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    """Bring this layer's weights to the loaded networks: nothing when they are applied already,
    else restore the backed-up originals and add each loaded network's difference."""
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    is_mha = isinstance(self, torch.nn.MultiheadAttention)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != () and not allowed_layer_without_weight(self):
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        if is_mha:
            self.network_weights_backup = (store_weights_backup(self.in_proj_weight),
                                           store_weights_backup(self.out_proj.weight))
        else:
            self.network_weights_backup = store_weights_backup(self.weight)

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if is_mha and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, "bias", None) is not None:
            bias_backup = store_weights_backup(self.bias)
        else:
            bias_backup = None
        if bias_backup is not None and current_names != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bias_backup

    if current_names == wanted_names:
        return
    network_restore_weights_from_backup(self)
    for net in loaded_networks:
        module = net.modules.get(network_layer_name, None)
        if module is not None and hasattr(self, "weight"):
            try:
                with torch.no_grad():
                    weight, bias = self.weight, self.bias
                    updown, ex_bias = module.calc_updown(weight)
                    if len(weight.shape) == 4 and weight.shape[1] == 9:
                        updown = torch.nn.functional.pad(updown, (0, 0, 0, 0, 0, 5))  # inpainting model
                    self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                    if ex_bias is not None and hasattr(self, "bias"):
                        if self.bias is None:
                            self.bias = torch.nn.Parameter(ex_bias).to(self.weight.dtype)
                        else:
                            self.bias.copy_((bias + ex_bias).to(dtype=self.bias.dtype))
            except RuntimeError as e:
                logging.debug(f"Network {net.name} layer {network_layer_name}: {e}")
                extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
            continue

        # OpenCLIP's MultiheadAttention: q/k/v/out modules are keyed `<name>_q_proj` ...; all four
        # are needed, else nothing is applied to it
        module_q = net.modules.get(network_layer_name + "_q_proj", None)
        module_k = net.modules.get(network_layer_name + "_k_proj", None)
        module_v = net.modules.get(network_layer_name + "_v_proj", None)
        module_out = net.modules.get(network_layer_name + "_out_proj", None)
        if isinstance(self, torch.nn.MultiheadAttention) and module_q and module_k and module_v and module_out:
            try:
                with torch.no_grad():
                    qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                    updown_q, _ = module_q.calc_updown(qw)
                    updown_k, _ = module_k.calc_updown(kw)
                    updown_v, _ = module_v.calc_updown(vw)
                    del qw, kw, vw
                    updown_qkv = torch.vstack([updown_q, updown_k, updown_v])
                    updown_out, ex_bias = module_out.calc_updown(self.out_proj.weight)
                    self.in_proj_weight += updown_qkv
                    self.out_proj.weight += updown_out
                # as in the host, the bias is changed outside no_grad
                if ex_bias is not None:
                    if self.out_proj.bias is None:
                        self.out_proj.bias = torch.nn.Parameter(ex_bias)
                    else:
                        self.out_proj.bias += ex_bias
            except RuntimeError as e:
                logging.debug(f"Network {net.name} layer {network_layer_name}: {e}")
                extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
            continue

        if module is None:
            continue
        logging.debug(f"Network {net.name} layer {network_layer_name}: couldn't find supported operation")
        extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
    self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def _refuse_functional():
    if shared.opts.lora_functional:
        raise NotImplementedError("the test double has no lora_functional (old Lora method)")


def network_Linear_forward(self, input):
    _refuse_functional()
    network_apply_weights(self)
    return originals.Linear_forward(self, input)


def network_Linear_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Linear_load_state_dict(self, *args, **kwargs)


def network_Conv2d_forward(self, input):
    _refuse_functional()
    network_apply_weights(self)
    return originals.Conv2d_forward(self, input)


def network_Conv2d_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Conv2d_load_state_dict(self, *args, **kwargs)


def network_GroupNorm_forward(self, input):
    _refuse_functional()
    network_apply_weights(self)
    return originals.GroupNorm_forward(self, input)


def network_GroupNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.GroupNorm_load_state_dict(self, *args, **kwargs)


def network_LayerNorm_forward(self, input):
    _refuse_functional()
    network_apply_weights(self)
    return originals.LayerNorm_forward(self, input)


def network_LayerNorm_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.LayerNorm_load_state_dict(self, *args, **kwargs)


def network_MultiheadAttention_forward(self, *args, **kwargs):
    _refuse_functional()
    network_apply_weights(self)
    return originals.MultiheadAttention_forward(self, *args, **kwargs)


def network_MultiheadAttention_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.MultiheadAttention_load_state_dict(self, *args, **kwargs)


def process_network_files(names: list[str] | None = None):
    candidates = list(shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    candidates += list(shared.walk_files(shared.cmd_opts.lyco_dir_backcompat,
                                         allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    for filename in candidates:
        if os.path.isdir(filename):
            continue
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def update_available_networks_by_names(names: list[str]):
    process_network_files(names)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


originals: lora_patches.LoraPatches = None
extra_network_lora = None

available_networks = {}
available_network_aliases = {}
loaded_networks = []
loaded_bundle_embeddings = {}
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}

list_available_networks()
