"""MSANet (Iqbal et al., 2022; AIVResearch/MSANet ``model/MSANet.py``): BAM + multi-similarity
and attention guidance, stage 2 on BAM's stage-1 PSPNet.

The module is ``bam.BAM`` with ``msanet=True`` and MSANet's three departures from BAM
(reference_msanet.md §15): the prior from the *unmasked* support layer4
(``prior_support_masked=False``), the raw VGG layer2 for the Gram matrix
(``vgg_gram_resized=False``), and the pre-fix k-shot gather (``kshot_unsort='msanet'``: the
sorted-order weights applied to the shots in input order). Its own parts:
  * hyper-features: the pre-ReLU residual sums of every bottleneck from layer1's last on (VGG:
    conv4_x, conv5_x raw, and layer4's output), from one frozen backbone pass;
  * multi-similarity (``bam.similarity_map``): per hyper-feature, the mean over the kept support
    pixels (the chained mask ≥ the mean of its positive values) of the clamped cosine with each
    query pixel; grouped layer2 | layer3 | layer4 (13 maps R50, 30 R101, 7 VGG), averaged over
    shots (VGG's layer2 group: the last shot's, as the official code does), then
    ``hyper_final`` (1x1 conv with bias → BN → ReLU, 64 ch);
  * the attention module ``gam``: a channel gate of each shot's reduced support feature,
    averaged over shots (256 ch);
  * init_merge on [query feature, prototype, hyper_final, prior, gam] (833 ch).
Everything else (ASPP, res1/res2, cls_meta, ψ, k-shot weights, ensemble, losses, frozen BN and
the base learner's active dropout) is BAM's. Trained with one SGD group over all learnable
tensors (MSANet's ``train.py``), which is what fss_jax's optimiser does anyway.
"""
import ml_collections

from fss_jax.models import bam

MSANet = bam.BAM


def model_config() -> ml_collections.ConfigDict:
  """MSANet's ``config.model`` fields: BAM's, with MSANet's defaults."""
  c = bam.model_config()
  c.kshot_unsort = "msanet"
  c.prior_support_masked = False
  c.vgg_gram_resized = False
  return c


def from_config(config) -> bam.BAM:
  """The MSANet of ``config.model`` with ``config.data.shot`` shots."""
  model = bam.from_config(config)
  return model.clone(msanet=True)
