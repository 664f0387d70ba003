"""What each federated method decides on the server; everything else (sockets, rounds, checkpoints)
stays in app.py. The methods and every choice made where a paper is unclear: docs/strategies.md.

A strategy answers two questions:
- `settings`: the typed recipe every device receives in RoundStart (runtime.methods.MethodSettings);
  from it the server also knows what to send (towers or G, FedMD's consensus) and whether uploads come;
- `score`: how far the server trusts one upload on each public sample. Uploads are folded into the
  per-modality teacher as they arrive (distill.TeacherFold), with per-sample weights softmax_c(score);
  stage 3 distils the global encoders toward it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedafd.cloud_server.distill import sed_scores
from fedafd.runtime.config import ServerConfig
from fedafd.runtime.methods import MethodSettings
from fedafd.runtime.wire import other_modality


class Strategy:
    """The shared defaults: no federated part switched on, and the plain mean as the teacher."""

    name = ""
    uplink = True

    def __init__(self, config: ServerConfig):
        self.config = config

    def switches(self) -> dict:
        """The fields of MethodSettings this method turns on (the rest stay off)."""
        return {}

    def settings(self) -> MethodSettings:
        c = self.config
        base = dict(strategy=self.name, uplink=self.uplink, feature_codec=c.feature_codec, local_init="random",
                    baa=False, beta=0.0, real_label=1.0, gff=False, digest="none", digest_weight=0.0,
                    contrast_weight=0.0, contrast_temperature=1.0, infiltration_weight=0.0, dominant_modality="text")
        return MethodSettings(**{**base, **self.switches()})

    def score(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        """(P,) scores of one upload's (P, d) features of `modality`; equal scores make the mean."""
        return torch.zeros(len(features))


class Local(Strategy):
    """LOCAL, the no-federation baseline: devices train on their own data only; the server only trains
    its encoders on the public set. Nothing but metrics goes up, nothing but the round's start comes down."""

    name = "local"
    uplink = False


class FedAfd(Strategy):
    """FedAFD (method.md): BAA and GFF on the devices, similarity-guided ensemble distillation on the server.
    The ablation switches baa, gff, sed turn each part off; without SED the teacher is the plain mean."""

    name = "fedafd"

    def switches(self) -> dict:
        c = self.config
        return dict(baa=c.baa, beta=c.beta, real_label=c.real_label, gff=c.gff, local_init=c.local_init)

    def score(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        if not self.config.sed:
            return super().score(modality, features, server_features)
        return sed_scores(features.unsqueeze(0), server_features[modality], self.config.sed_chunk)[0]


class FedMd(Strategy):
    """FedMD at the representation level: the teacher is the consensus (the plain mean of the devices'
    public features); next round each device first digests it, then trains on its own data."""

    name = "fedmd"

    def switches(self) -> dict:
        return dict(digest="consensus", digest_weight=1.0)


class CreamFl(Strategy):
    """CreamFL: global-local cross-modal ensemble (a device's image feature of pair k is scored against the
    server's text features, text against image), and inter-/intra-modal contrastive regularisers on the
    devices against the server's public features."""

    name = "creamfl"

    def switches(self) -> dict:
        return dict(contrast_weight=0.5, contrast_temperature=0.5)

    def score(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        other = server_features[other_modality(modality)]
        return sed_scores(features.unsqueeze(0), other, self.config.sed_chunk)[0]


CONFIDENCE_TEMPERATURE = 0.07
"""Temperature of the retrieval distributions FedGEMS and FedET judge confidence by (CLIP's initial one): at 1,
cosines in [-1, 1] spread over P samples give every client a near-uniform distribution and the same entropy."""
UNSELECTED = 1e4
"""How far FedGEMS lowers the score of a client that does not retrieve its pair: exp(-1e4) is 0 in float32, so
such clients get no weight wherever another client is right, and equal footing where none is."""


def retrieval_log_probs(features: Tensor, anchors: Tensor, temperature: float, chunk_size: int) -> Tensor:
    """(P, P) log softmax_j <v_k, a_j> / T of L2-normalised features against the server's anchors, by rows."""
    v, a = F.normalize(features.float(), dim=-1), F.normalize(anchors.float(), dim=-1)
    return torch.cat([torch.log_softmax(v[start:start + chunk_size] @ a.T / temperature, dim=1)
                      for start in range(0, len(v), chunk_size)])


class _LargeServerModel(Strategy):
    """FedGEMS and FedET train a large server model from small device models; at the representation level
    both judge an upload by its retrieval distribution over the server's other-modality features, and both
    devices take the server's knowledge back with a digest toward its global features."""

    def switches(self) -> dict:
        return dict(digest="global", digest_weight=1.0)

    def log_probs(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        return retrieval_log_probs(features, server_features[other_modality(modality)], CONFIDENCE_TEMPERATURE,
                                   self.config.sed_chunk)


class FedGems(_LargeServerModel):
    """FedGEMS (selective knowledge fusion) at the representation level: on each public sample only the devices
    that retrieve its pair at top-1 among the server's other-modality features are fused, weighted by
    softmax_c(1 / entropy); where none does, all devices are, by the same weights. Devices then transfer the
    server's knowledge back: a digest pass toward its global features."""

    name = "fedgems"

    def score(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        log_probs = self.log_probs(modality, features, server_features)
        entropy = -(log_probs.exp() * log_probs).sum(1)
        correct = log_probs.argmax(1) == torch.arange(len(features))
        return 1.0 / entropy.clamp_min(1e-6) - UNSELECTED * (~correct).float()


class FedEt(_LargeServerModel):
    """FedET at the representation level: each device's upload is weighted per sample by its confidence, the
    variance of its log-probabilities over P (alpha_ck = sigma_ck / sum_c sigma_ck, i.e. softmax_c of log sigma);
    devices transfer the server's knowledge back with a digest toward its global features."""

    name = "fedet"

    def score(self, modality: str, features: Tensor, server_features: dict[str, Tensor]) -> Tensor:
        return torch.log(self.log_probs(modality, features, server_features).var(dim=1).clamp_min(1e-12))


class FedCmi(Strategy):
    """FedCMI at the representation level: classification devices add an infiltration projector under their
    classifier, distilled toward the server's features of the dominant modality (text: its frozen backbone
    sorts the public set's categories better, 78.3 % against 67.9 % nearest-class-mean,
    `python -m fedafd.benchmarks.modality_probe`), with class-wise
    temperatures; the server fuses the uploads by their plain mean (FedCMI itself averages weights)."""

    name = "fedcmi"

    def switches(self) -> dict:
        return dict(infiltration_weight=1.0, contrast_temperature=0.5, dominant_modality="text")


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAfd, Local, FedMd, CreamFl, FedGems, FedEt, FedCmi)}


def build_strategy(config: ServerConfig) -> Strategy:
    try:
        return STRATEGY_CLASSES[config.strategy](config)
    except KeyError:
        raise ValueError(f"unknown strategy {config.strategy!r}; known: {', '.join(STRATEGY_CLASSES)}") from None
