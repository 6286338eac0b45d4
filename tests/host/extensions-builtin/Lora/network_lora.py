"""LoRA (extensions-builtin/Lora/network_lora.py): `lora_up`/`lora_down` (or PEFT's `lora_B`/`lora_A`),
optional `lora_mid` (CP decomposition), `alpha`; linear and conv layers."""

import lyco_helpers
import network
import torch

from modules import devices


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        if all(x in weights.w for x in ["lora_A.weight", "lora_B.weight"]):
            w = weights.w.copy()
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.up_weight = self.factor(weights.w, "lora_up.weight")
        self.down_weight = self.factor(weights.w, "lora_down.weight")
        self.mid_weight = self.factor(weights.w, "lora_mid.weight", none_ok=True)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def factor(self, weights, key, none_ok=False):
        """The factor as the host's helper layer holds it, in devices.dtype: a matrix for a linear
        layer; for a conv layer `down` and `mid` with the layer's kernel (down 1x1 when the file's is),
        `up` 1x1."""
        weight = weights.get(key)
        if weight is None and none_ok:
            return None
        is_linear = type(self.sd_module) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear,
                                             torch.nn.MultiheadAttention)
        is_conv = type(self.sd_module) is torch.nn.Conv2d
        if is_linear:
            weight = weight.reshape(weight.shape[0], -1)
            shape = tuple(weight.shape)
        elif is_conv and key == "lora_down.weight":
            if len(weight.shape) == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            kernel = tuple(self.sd_module.kernel_size) if weight.shape[2] != 1 or weight.shape[3] != 1 else (1, 1)
            shape = (weight.shape[0], weight.shape[1], *kernel)
        elif is_conv and key == "lora_mid.weight":
            shape = (weight.shape[0], weight.shape[1], *self.sd_module.kernel_size)
        elif is_conv and key == "lora_up.weight":
            shape = (weight.shape[0], weight.shape[1], 1, 1)
        else:
            raise AssertionError(f"Lora layer {self.network_key} matched a layer with unsupported type: "
                                 f"{type(self.sd_module).__name__}")
        if tuple(weight.shape) != shape:
            weight = weight.reshape(shape)
        return weight.detach().to(device=devices.cpu, dtype=devices.dtype).clone()

    def calc_updown(self, orig_weight):
        up = self.up_weight.to(orig_weight.device)
        down = self.down_weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if self.mid_weight is not None:
            mid = self.mid_weight.to(orig_weight.device)
            updown = lyco_helpers.rebuild_cp_decomposition(up, down, mid)
            output_shape += mid.shape[2:]
        else:
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = lyco_helpers.rebuild_conventional(up, down, output_shape, self.network.dyn_dim)
        return self.finalize_updown(updown, orig_weight, output_shape)
