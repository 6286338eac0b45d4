"""LoKr (extensions-builtin/Lora/network_lokr.py): the Kronecker product of `lokr_w1` and `lokr_w2`,
each given whole or as a low-rank product (`_a @ _b`, `lokr_t2` for a CP form of w2)."""

import lyco_helpers
import network
import torch


class ModuleTypeLokr(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        has_1 = "lokr_w1" in weights.w or ("lokr_w1_a" in weights.w and "lokr_w1_b" in weights.w)
        has_2 = "lokr_w2" in weights.w or ("lokr_w2_a" in weights.w and "lokr_w2_b" in weights.w)
        if has_1 and has_2:
            return NetworkModuleLokr(net, weights)
        return None


def make_kron(orig_shape, w1, w2):
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous()).reshape(orig_shape)


class NetworkModuleLokr(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.w1 = weights.w.get("lokr_w1")
        self.w1a = weights.w.get("lokr_w1_a")
        self.w1b = weights.w.get("lokr_w1_b")
        self.w2 = weights.w.get("lokr_w2")
        self.w2a = weights.w.get("lokr_w2_a")
        self.w2b = weights.w.get("lokr_w2_b")
        self.t2 = weights.w.get("lokr_t2")
        # the rank (for alpha / dim) is w2b's when there is one, else w1b's
        if self.w1b is not None:
            self.dim = self.w1b.shape[0]
        if self.w2b is not None:
            self.dim = self.w2b.shape[0]

    def calc_updown(self, orig_weight):
        device = orig_weight.device
        w1 = self.w1.to(device) if self.w1 is not None else self.w1a.to(device) @ self.w1b.to(device)
        if self.w2 is not None:
            w2 = self.w2.to(device)
        elif self.t2 is None:
            w2 = self.w2a.to(device) @ self.w2b.to(device)
        else:
            w2 = lyco_helpers.make_weight_cp(self.t2.to(device), self.w2a.to(device), self.w2b.to(device))
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_weight.shape) == 4:
            output_shape = orig_weight.shape
        return self.finalize_updown(make_kron(output_shape, w1, w2), orig_weight, output_shape)
