"""A PyTorch oracle of the reference PFENet (dvlab-research/PFENet), written from the facts.

Used only by the parity tests: it follows the reference forward step by step (per-shot backbone
calls, the bmm prior, the FEM pyramid), in NCHW. Module registration order, and therefore the
state_dict keys and their order, is the reference's, so a reference checkpoint loads strictly.
No tensor is created with a fixed dtype: ``model.double()`` gives a float64 oracle.
"""
import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_resnet_ref, torch_vgg_ref


def _seq(*mods):
  return nn.Sequential(*mods)


def _conv(cin, cout, k, bias=False):
  return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _resize(x, size):
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def weighted_gap(feat, mask):
  """Reference Weighted_GAP: mean·hw / (mean(m)·hw + 0.0005), via avg_pool2d (not a plain sum)."""
  feat = feat * mask
  h, w = feat.shape[-2:]
  area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
  return F.avg_pool2d(feat, (h, w)) * h * w / area


def prior_mask(q4, s4, m_full, out_size):
  """One shot's training-free prior (§3): (B,C,h,h), (B,C,hs,hs), (B,1,H,W) → (B,1,*out_size)."""
  b, c, sp, _ = q4.shape
  m4 = _resize(m_full, (s4.shape[2], s4.shape[2]))  # the reference uses size(2) twice
  s = (s4 * m4).reshape(b, c, -1).permute(0, 2, 1)  # (B, hw_s, C)
  q = q4.reshape(b, c, -1)  # (B, C, hw_q)
  # eps is added to the product of norms, not clamped per vector.
  sim = torch.bmm(s, q) / (torch.bmm(s.norm(2, 2, True), q.norm(2, 1, True)) + 1e-7)
  sim = sim.max(1)[0].view(b, sp * sp)  # max over support pixels; square query map assumed
  lo, hi = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
  sim = (sim - lo) / (hi - lo + 1e-7)
  return _resize(sim.view(b, 1, sp, sp), out_size)


class RefPFENet(nn.Module):
  """Reference PFENet; ``forward`` returns a dict of outputs and intermediates."""

  def __init__(self, layers=50, shot=1, bins=(60, 30, 15, 8)):
    super().__init__()
    self.vgg = layers == "vgg"
    bb = torch_vgg_ref.VGG16BN() if self.vgg else torch_resnet_ref.DeepStemResNet(layers)
    self.layer0, self.layer1, self.layer2 = bb.layer0, bb.layer1, bb.layer2
    self.layer3, self.layer4 = bb.layer3, bb.layer4
    d, fea_dim = 256, (512 + 256 if self.vgg else 1024 + 512)
    self.cls = _seq(_conv(d, d, 3), nn.ReLU(), nn.Dropout2d(0.1), _conv(d, 2, 1, True))
    self.down_query = _seq(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.down_supp = _seq(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.bins, self.shot = tuple(bins), shot
    # Reference avgpool_list: absolute bins only, indexed by bin position (mixing mis-indexes).
    self.pool_bins = [b for b in self.bins if b > 1]
    self.init_merge = nn.ModuleList([_seq(_conv(2 * d + 1, d, 1), nn.ReLU()) for _ in bins])
    self.beta_conv = nn.ModuleList([
        _seq(_conv(d, d, 3), nn.ReLU(), _conv(d, d, 3), nn.ReLU()) for _ in bins])
    self.inner_cls = nn.ModuleList([
        _seq(_conv(d, d, 3), nn.ReLU(), nn.Dropout2d(0.1), _conv(d, 2, 1, True)) for _ in bins])
    self.res1 = _seq(_conv(d * len(bins), d, 1), nn.ReLU())
    self.res2 = _seq(_conv(d, d, 3), nn.ReLU(), _conv(d, d, 3), nn.ReLU())
    self.alpha_conv = nn.ModuleList([_seq(_conv(2 * d, d, 1), nn.ReLU()) for _ in self.bins[1:]])

  def backbone(self, x, m_full=None):
    """No-grad layer0..4; with m_full (support) layer4 sees layer3 · mask(layer3 size)."""
    with torch.no_grad():
      f2 = self.layer2(self.layer1(self.layer0(x)))
      f3 = self.layer3(f2)
      m = None if m_full is None else _resize(m_full, f3.shape[2:])
      f4 = self.layer4(f3 if m is None else f3 * m)
      if self.vgg:  # VGG layer2 is stride 8, layer3 stride 16
        f2 = _resize(f2, f3.shape[2:])
    return torch.cat([f3, f2], 1), f4, m

  def forward(self, x, s_x, s_y):
    """x (B,3,H,W), s_x (B,K,3,H,W), s_y (B,K,H,W) float labels in {0,1,255}."""
    big_h, big_w = x.shape[2:]
    assert (big_h - 1) % 8 == 0 and (big_w - 1) % 8 == 0
    out_size = ((big_h - 1) // 8 * 8 + 1, (big_w - 1) // 8 * 8 + 1)
    feat, q4, _ = self.backbone(x)
    q3_size = feat.shape[2:]
    query_feat = self.down_query(feat)

    protos, supp4, masks = [], [], []
    for i in range(self.shot):
      m_full = (s_y[:, i] == 1).to(x.dtype)[:, None]
      masks.append(m_full)
      feat, s4, m = self.backbone(s_x[:, i], m_full)
      supp4.append(s4)
      protos.append(weighted_gap(self.down_supp(feat), m))  # with gradient into down_supp

    priors = [prior_mask(q4, s4, m_full, q3_size) for s4, m_full in zip(supp4, masks)]
    prior = _resize(torch.cat(priors, 1).mean(1).unsqueeze(1), query_feat.shape[2:])
    proto = protos[0]
    if self.shot > 1:  # same summation order as the reference's in-place accumulation
      proto = sum(protos[1:], protos[0]) / len(protos)

    h, w = query_feat.shape[2:]
    pyramid, aux = [], []
    for idx, tmp in enumerate(self.bins):
      if tmp <= 1.0:  # relative bin (so an absolute 1 means full size), truncated, from the height
        size = int(h * tmp)
        qb = F.adaptive_avg_pool2d(query_feat, size)
      else:
        size = tmp
        qb = F.adaptive_avg_pool2d(query_feat, self.pool_bins[idx])
      merge = torch.cat([qb, proto.expand(-1, -1, size, size),
                         _resize(prior, (size, size))], 1)
      merge = self.init_merge[idx](merge)
      if idx >= 1:
        prev = _resize(pyramid[idx - 1], (size, size))
        merge = self.alpha_conv[idx - 1](torch.cat([merge, prev], 1)) + merge
      merge = self.beta_conv[idx](merge) + merge
      aux.append(self.inner_cls[idx](merge))
      pyramid.append(_resize(merge, (h, w)))
    z = self.res1(torch.cat(pyramid, 1))
    z = self.res2(z) + z
    return {"logits": _resize(self.cls(z), out_size),
            "aux_logits": [_resize(a, out_size) for a in aux],
            "prior": prior, "prototype": proto, "shot_prototypes": protos,
            "query_feat": query_feat, "query_feat_4": q4, "supp_feat_4": supp4}


def loss_terms(out, y):
  """(main CE, mean of the aux CEs), ignore 255, as the reference's training forward."""
  ce = nn.CrossEntropyLoss(ignore_index=255)
  y = y.long()
  aux = sum(ce(a, y) for a in out["aux_logits"]) / len(out["aux_logits"])
  return ce(out["logits"], y), aux


def reference_loss(out, y, aux_weight=1.0):
  """Reference training loss: main CE + aux_weight · mean of the auxiliary CEs."""
  main, aux = loss_terms(out, y)
  return main + aux_weight * aux
