"""A PyTorch oracle of the "blog" PANet (reference_panet.md §15, right column), tests only.

An NCHW transcription of the PANet variant of a 2023 write-up, step by step as §15 reads it:
the deep-stem ResNet (``torch_resnet_ref``'s stem and bottlenecks) run to layer3 only, layer2
stride 2, layer3 dilation 2, the last block of layer3 without its final ReLU; layer0 and layer1
under ``torch.no_grad()``; masked average pooling with the mask resized to the feature size
(bilinear, align_corners=True), p = Σ f·m / (Σ m + 1e-5), fg = (mask == 1), bg = (mask == 0);
prototypes = mean over shots; ``F.cosine_similarity`` (dim 1) × 10 against [bg, fg]; logits
bilinear (align_corners=True) to the input size; PAR from the query's ground-truth mask, each
support scored against the query prototypes (cos × 10, upsampled align_corners=True).

What §15 does not show and this oracle fixes (fss_jax's choices, fss_jax/models/panet.py):
- PAR's loss: per support ``F.cross_entropy(pred, target, ignore_index=255)`` with target 1 on
  (mask == 1), 0 on (mask == 0), 255 elsewhere (254 too); the mean over shots, then over the
  episodes of the batch; total = query CE (ignore 255, over the batch) + align_weight · PAR.
- The module tree: ``encoder.backbone`` is the ResNet (``layer0`` an nn.Sequential, the
  checkpoints' ``layer0.{0,1,3,4,6,7}`` naming), the official PANet's layout, so fss_jax's
  'model' naming (``encoder.backbone.layer2.0.conv1.weight``) loads it.
- The encoder runs once on all supports (shots concatenated, episode-major) and once on the
  query; with BN in eval mode (the tests') that is the same as per-shot calls.

No tensor is created with a fixed float dtype: ``model.double()`` gives a float64 oracle.
"""
import collections

import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_resnet_ref

SCALER = 10
EPS = 1e-5
IGNORE = 255


class Bottleneck(torch_resnet_ref.Bottleneck):
  """``torch_resnet_ref.Bottleneck`` with the blog's ``last_relu`` flag."""

  def __init__(self, *args, last_relu=True, **kwargs):
    super().__init__(*args, **kwargs)
    self.last_relu = last_relu

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    out = out + identity
    return self.relu(out) if self.last_relu else out


def _conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BlogResNet(nn.Module):
  """Deep-stem ResNet, layer0..layer3 (no layer4), width ``w`` (64: ResNet-50) and ``blocks``
  per stage; the last block of layer3 has no final ReLU."""

  def __init__(self, width=64, blocks=(3, 4, 6)):
    super().__init__()
    w = width
    self.layer0 = nn.Sequential(
        _conv3x3(3, w, 2), nn.BatchNorm2d(w), nn.ReLU(),
        _conv3x3(w, w), nn.BatchNorm2d(w), nn.ReLU(),
        _conv3x3(w, 2 * w), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1))
    self.inplanes = 2 * w
    self.layer1 = self._make_layer(w, blocks[0], 1, 1)
    self.layer2 = self._make_layer(2 * w, blocks[1], 2, 1)
    self.layer3 = self._make_layer(4 * w, blocks[2], 1, 2, last_relu=False)

  def _make_layer(self, planes, blocks, stride, dilation, last_relu=True):
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample,
                         last_relu=last_relu or blocks > 1)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes, 1, dilation,
                          last_relu=last_relu or i < blocks - 1) for i in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    with torch.no_grad():  # layer0 and layer1 frozen
      x = self.layer1(self.layer0(x))
    return self.layer3(self.layer2(x))


def masked_average(fts, mask):
  """fts (N,C,h,w), mask (N,H,W) 0/1 → (N,C): the mask resized to (h,w), bilinear,
  align_corners=True; Σ f·m / (Σ m + 1e-5)."""
  m = F.interpolate(mask.unsqueeze(1).to(fts.dtype), size=fts.shape[-2:], mode="bilinear",
                    align_corners=True)
  return (fts * m).sum(dim=(2, 3)) / (m.sum(dim=(2, 3)) + EPS)


def scores(fts, bg, fg, scaler=SCALER):
  """fts (N,C,h,w), bg / fg (N,C) → (N,2,h,w): scaler · cos against [bg, fg]."""
  return torch.stack([F.cosine_similarity(fts, bg[..., None, None], dim=1) * scaler,
                      F.cosine_similarity(fts, fg[..., None, None], dim=1) * scaler], dim=1)


class BlogPANet(nn.Module):

  def __init__(self, width=64, blocks=(3, 4, 6)):
    super().__init__()
    self.encoder = nn.Sequential(collections.OrderedDict(backbone=BlogResNet(width, blocks)))

  def forward(self, supp_imgs, supp_masks, qry_imgs, qry_mask=None):
    """supp_imgs (B,K,3,H,W), supp_masks (B,K,H,W) (1 fg, 0 bg, 255/254 neither), qry_imgs
    (B,3,H,W), qry_mask (B,H,W) (for PAR; None: no PAR). Returns a dict: logits (B,2,H,W),
    scores (B,2,h,w), supp_fg / supp_bg (B,K,C), fg_prototype / bg_prototype (B,C), query_feat
    (B,C,h,w), supp_feat (B,K,C,h,w); with ``qry_mask`` also qry_prototypes (B,2,C) [bg, fg],
    par_ce (B,K), align_loss."""
    b, k = supp_imgs.shape[:2]
    big = supp_imgs.shape[-2:]
    backbone = self.encoder.backbone
    supp_ft = backbone(supp_imgs.reshape((b * k,) + supp_imgs.shape[2:]))
    qry_ft = backbone(qry_imgs)
    c, h, w = qry_ft.shape[1:]
    supp_ft = supp_ft.view(b, k, c, h, w)
    supp_fg = torch.stack([masked_average(supp_ft[:, s], (supp_masks[:, s] == 1).float())
                           for s in range(k)], dim=1)
    supp_bg = torch.stack([masked_average(supp_ft[:, s], (supp_masks[:, s] == 0).float())
                           for s in range(k)], dim=1)
    fg_proto = supp_fg.mean(dim=1)
    bg_proto = supp_bg.mean(dim=1)
    pred = scores(qry_ft, bg_proto, fg_proto)
    out = {"logits": F.interpolate(pred, size=big, mode="bilinear", align_corners=True),
           "scores": pred, "supp_fg": supp_fg, "supp_bg": supp_bg, "fg_prototype": fg_proto,
           "bg_prototype": bg_proto, "query_feat": qry_ft, "supp_feat": supp_ft}
    if qry_mask is not None:
      out.update(self.align(qry_ft, qry_mask, supp_ft, supp_masks))
    return out

  def align(self, qry_ft, qry_mask, supp_ft, supp_masks):
    b, k = supp_ft.shape[:2]
    q_bg = masked_average(qry_ft, (qry_mask == 0).float())
    q_fg = masked_average(qry_ft, (qry_mask == 1).float())
    ce = []
    for s in range(k):
      pred = scores(supp_ft[:, s], q_bg, q_fg)
      pred = F.interpolate(pred, size=supp_masks.shape[-2:], mode="bilinear",
                           align_corners=True)
      m = supp_masks[:, s]
      target = torch.full_like(m, IGNORE).long()
      target[m == 1] = 1
      target[m == 0] = 0
      ce.append(torch.stack([F.cross_entropy(pred[i:i + 1], target[i:i + 1],
                                             ignore_index=IGNORE) for i in range(b)]))
    ce = torch.stack(ce, dim=1)  # (B,K)
    return {"qry_prototypes": torch.stack([q_bg, q_fg], dim=1), "par_ce": ce,
            "align_loss": ce.mean(dim=1).mean()}


def total_loss(out, query_labels, align_weight=1.0):
  """(total, query CE): CE(logits, query label, ignore 255) + align_weight · PAR."""
  query_loss = F.cross_entropy(out["logits"], query_labels.long(), ignore_index=IGNORE)
  return query_loss + align_weight * out["align_loss"], query_loss
