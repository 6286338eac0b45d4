"""Full weight differences (extensions-builtin/Lora/network_full.py): `diff`, optional `diff_b` for
the bias."""

import network


class ModuleTypeFull(network.ModuleType):
    def create_module(self, net: network.Network, weights: network.NetworkWeights):
        if all(x in weights.w for x in ["diff"]):
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    def __init__(self, net: network.Network, weights: network.NetworkWeights):
        super().__init__(net, weights)
        self.weight = weights.w.get("diff")
        self.ex_bias = weights.w.get("diff_b")

    def calc_updown(self, orig_weight):
        ex_bias = self.ex_bias.to(orig_weight.device) if self.ex_bias is not None else None
        return self.finalize_updown(self.weight.to(orig_weight.device), orig_weight, self.weight.shape, ex_bias)
