"""sgm's denoiser scalings; the host reads only which class the model's is (eps or v)."""


class EpsScaling:
    pass


class VScaling:
    pass
