"""A PyTorch oracle of BAM (chunbolang/BAM, "Learning What Not to Segment"), written from the facts.

Two models, both NCHW, used only by the tests:

- ``RefPSPNet``: BAM's stage-1 base learner (``model/PSPNet.py: OneModel``, ``model/PPM.py``;
  reference_msanet.md §1.1): deep-stem dilated ResNet-50/101 (``torch_resnet_ref.DeepStemResNet``)
  or the VGG16-bn cut (``torch_vgg_ref.VGG16BN``), PPM bins (1, 2, 3, 6), ``cls`` with C classes.
- ``RefBAM``: BAM's stage-2 meta learner (``model/BAM.py: OneModel``; reference_msanet.md §3, §4,
  §7, §8, §9, §15) on the frozen backbone and base learner taken from a ``RefPSPNet``.

Line numbers below are those of chunbolang/BAM at c0f935c (the model code last changed in 958e58a).
Module registration order is the official one, so ``state_dict()`` has the official keys in the
official order and an official checkpoint loads strictly:

- PSPNet: ``layer0..layer4.*``, then the same tensors again as ``encoder.0..encoder.4.*`` (the
  official constructor registers the five layers a second time in ``self.encoder``; a state_dict
  keeps both copies), then ``ppm.features.{0..3}.{1.weight,2.*}``, ``cls.{0.weight,1.*,4.*}``.
  692 keys (R50), 1304 (R101), 214 (VGG).
- BAM: ``layer0..layer4.*``, ``learner_base.0.*`` (PPM), ``learner_base.1.*`` (cls), ``down_query``,
  ``down_supp``, ``init_merge``, ``ASPP_meta.layer6_{0..4}``, ``res1_meta``, ``res2_meta``,
  ``cls_meta``, ``gram_merge``, ``cls_merge``, ``kshot_rw`` (shot > 1 only).

No tensor is created with a fixed dtype (the official ``.float()`` on the support mask becomes
``.to(x.dtype)``): ``model.double()`` gives a float64 oracle.

Dropout: ``RefBAM.train()`` keeps every BatchNorm in eval mode (train.py calls
``model.apply(fix_bn)`` after ``model.train()``), so ``model.train()`` reproduces the official
training forward (Dropout2d active everywhere, including the frozen base learner's ``cls``), and
``model.eval()`` + ``forward(..., train=True)`` gives the training forward with dropout off (the
training-only ensemble rule applied), which is what the parity tests compare.

From an official (or ``official_checkpoint``-made) stage-1 file, as BAM.py:60-74 does::

  psp = load_official_state_dict(RefPSPNet(50, 16), torch.load(path)["state_dict"])
  bam = RefBAM(50, 16, shot=1, pspnet=psp)

Checked once against the official code run on CPU (float32 and float64, R50 65/97/473, VGG 129,
1- and 5-shot, eval and training forwards, losses and gradients): identical to the last bit.
"""
import collections

import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_resnet_ref, torch_vgg_ref
from tests.torch_pfenet_ref import prior_mask, weighted_gap

PPM_BINS = (1, 2, 3, 6)
REDUCE_DIM = 256


def _resize(x, size):
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv(cin, cout, k, bias=False):
  return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def out_size(h, w, zoom_factor=8):
  """PSPNet.py:120-121 / BAM.py:181-182: ``int((H - 1) / 8 * zoom_factor + 1)`` (true division).

  With zoom_factor 8 this is (H, W) for every H (= (H-1)//8*8+1 only when H % 8 == 1).
  """
  return (int((h - 1) / 8 * zoom_factor + 1), int((w - 1) / 8 * zoom_factor + 1))


class PPM(nn.Module):
  """model/PPM.py: per bin AdaptiveAvgPool2d(bin) → 1×1 conv (no bias) → BN → ReLU → bilinear
  (align_corners) back; output concat[x, p1, p2, p3, p6]: (B,C,h,w) → (B,2C,h,w) for C/4 per bin."""

  def __init__(self, in_dim, reduction_dim, bins=PPM_BINS):
    super().__init__()
    self.features = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                      nn.BatchNorm2d(reduction_dim), nn.ReLU()) for b in bins])

  def forward(self, x):
    return torch.cat([x] + [_resize(f(x), x.shape[2:]) for f in self.features], 1)


def pspnet_cls(fea_dim, classes):
  """PSPNet.py:95-100: 3×3 conv 2·fea_dim→512 (no bias) → BN → ReLU → Dropout2d(0.1) → 1×1 conv
  512→classes (bias)."""
  return nn.Sequential(_conv(fea_dim * 2, 512, 3), nn.BatchNorm2d(512), nn.ReLU(),
                       nn.Dropout2d(0.1), nn.Conv2d(512, classes, 1))


class RefPSPNet(nn.Module):
  """PSPNet.OneModel (stage 1). ``layers`` = 50 | 101 | 'vgg'; classes 16 (PASCAL) / 61 (COCO)."""

  def __init__(self, layers=50, classes=16, zoom_factor=8):
    """PSPNet.py:46-100, registration order: criterion, layer0..4, encoder, ppm, cls."""
    super().__init__()
    self.vgg = layers == "vgg"
    self.zoom_factor = zoom_factor
    self.criterion = nn.CrossEntropyLoss(ignore_index=255)  # no state; registered first
    bb = torch_vgg_ref.VGG16BN() if self.vgg else torch_resnet_ref.DeepStemResNet(layers)
    self.layer0, self.layer1, self.layer2 = bb.layer0, bb.layer1, bb.layer2
    self.layer3, self.layer4 = bb.layer3, bb.layer4
    # PSPNet.py:90: the same five modules registered again (duplicate state_dict keys).
    self.encoder = nn.Sequential(self.layer0, self.layer1, self.layer2, self.layer3, self.layer4)
    fea_dim = 512 if self.vgg else 2048
    self.ppm = PPM(fea_dim, fea_dim // len(PPM_BINS), PPM_BINS)
    self.cls = pspnet_cls(fea_dim, classes)

  def forward(self, x, y=None):
    """PSPNet.py:118-134. x (B,3,H,W) → dict:

    feat (B,2048|512,h,w) layer4 output; ppm (B,4096|1024,h,w); logits_lo (B,C,h,w);
    logits (B,C,*out_size(H,W)) (bilinear, align_corners; not resized for zoom_factor 1);
    pred = logits.argmax(1) (the official training return); loss when y (B,H,W) is given.
    """
    h, w = out_size(x.shape[2], x.shape[3], self.zoom_factor)
    feat = self.encoder(x)
    ppm = self.ppm(feat)
    logits_lo = self.cls(ppm)
    logits = _resize(logits_lo, (h, w)) if self.zoom_factor != 1 else logits_lo
    out = {"feat": feat, "ppm": ppm, "logits_lo": logits_lo, "logits": logits,
           "pred": logits.max(1)[1]}
    if y is not None:
      out["loss"] = pspnet_loss(out, y)
    return out


def pspnet_loss(out, y):
  """PSPNet.py:131: CrossEntropyLoss(ignore_index=255)(logits, y.long()) (mean over valid px)."""
  return nn.CrossEntropyLoss(ignore_index=255)(out["logits"], y.long())


def official_optimizer(model, lr, momentum=0.9, weight_decay=1e-4):
  """The official get_optim: SGD groups [encoder, ppm, cls] (PSPNet.py:102-110) or, for RefBAM,
  [down_query, down_supp, init_merge, ASPP_meta, res1_meta, res2_meta, cls_meta, gram_merge,
  cls_merge(, kshot_rw)] (BAM.py:132-160)."""
  if isinstance(model, RefPSPNet):
    names = ("encoder", "ppm", "cls")
  else:
    names = ("down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta",
             "cls_meta", "gram_merge", "cls_merge") + (("kshot_rw",) if model.shot > 1 else ())
  groups = [{"params": getattr(model, n).parameters()} for n in names]
  return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def official_checkpoint(model, epoch=1, ddp=True, optimizer=None):
  """The file train_base.py:207 / train.py:230 writes: {'epoch', 'state_dict', 'optimizer'}.

  ``ddp``: keys prefixed ``module.`` (the released models were trained under DDP). The optimizer
  state defaults to a fresh ``official_optimizer(model, lr=0.0)`` (the loaders never read it).
  For a RefPSPNet this is ``initmodel/PSPNet/{data}/split{k}/{backbone}/best.pth``.
  """
  prefix = "module." if ddp else ""
  sd = collections.OrderedDict((prefix + k, v.detach().clone())
                               for k, v in model.state_dict().items())
  opt = optimizer if optimizer is not None else official_optimizer(model, lr=0.0)
  return {"epoch": epoch, "state_dict": sd, "optimizer": opt.state_dict()}


def load_official_state_dict(model, new_param):
  """BAM.py:64-69 / train.py:86-91: strict load; on RuntimeError strip 7 chars (``module.``)."""
  new_param = collections.OrderedDict(new_param)
  try:
    model.load_state_dict(new_param)
  except RuntimeError:
    for key in list(new_param.keys()):
      new_param[key[7:]] = new_param.pop(key)
    model.load_state_dict(new_param)
  return model


class ASPP(nn.Module):
  """model/ASPP.py: branches [global, 1×1, 3×3 d6, d12, d18] (bias, ReLU, no BN) on 256 ch;
  global = avg over the map → 1×1 → ReLU → expand (no interpolation). (B,C,h,w) → (B,5C,h,w)."""

  def __init__(self, out_channels=256):
    super().__init__()
    c = out_channels

    def branch(k, d):
      return nn.Sequential(nn.Conv2d(c, c, k, padding=d if k == 3 else 0, dilation=d, bias=True),
                           nn.ReLU())
    self.layer6_0 = branch(1, 1)
    self.layer6_1 = branch(1, 1)
    self.layer6_2 = branch(3, 6)
    self.layer6_3 = branch(3, 12)
    self.layer6_4 = branch(3, 18)
    for m in self.modules():  # ASPP.py _init_weight: kaiming_normal_ on weights, biases default
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)

  def forward(self, x):
    size = x.shape[-2:]
    g = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, size[0], size[1])
    return torch.cat([g, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)


def gram_matrix(fea):
  """BAM.py:27-34 get_gram_matrix: (B,C,h,w) → (B,C,C), G_ij = <f_i,f_j>/(|f_i||f_j| + 1e-7)."""
  b, c, h, w = fea.shape
  fea = fea.reshape(b, c, h * w)
  fea_t = fea.permute(0, 2, 1)
  return torch.bmm(fea, fea_t) / (torch.bmm(fea.norm(2, 2, True), fea_t.norm(2, 1, True)) + 1e-7)


def _unit_merge_conv():
  """BAM.py:111-116: 1×1 conv 2→1 without bias, weights initialised (1, 0)."""
  conv = nn.Conv2d(2, 1, kernel_size=1, bias=False)
  conv.weight = nn.Parameter(torch.tensor([[1.0], [0.0]]).reshape_as(conv.weight))
  return conv


class RefBAM(nn.Module):
  """BAM.OneModel (stage 2); ``forward`` returns a dict of outputs and intermediates.

  layers 50 | 101 | 'vgg'; classes = the base learner's (16 PASCAL / 61 COCO, base_classes =
  classes - 1); ``pspnet``: the stage-1 RefPSPNet whose layer0..4, ppm and cls are taken (as
  BAM.py:60-74 after loading best.pth; a fresh one when None). Switches:

  - ``unsort``: 'bam' = BAM's current k-shot un-sorting ``weight.gather(1, idx2)`` (BAM.py:235,
    since 958e58a); 'msanet' = the pre-fix line MSANet keeps, ``gather(1, idx1.gather(1, idx2))``,
    i.e. the identity (reference_msanet.md §8.3).
  - ``vgg_gram_resized``: VGG only; True = BAM's Gram feature, layer2 after its resize to the
    layer3 size (the variable is overwritten at BAM.py:192/214 before the Gram, BAM.py:220/223);
    False = the raw layer2 (MSANet, §8.2).
  - ``low_fea``: config ``low_fea`` ('layer2' in every config; the digit picks the feature).
  - ``kshot_trans_dim``: 2 in every config (K→2→K MLP with biases); 0 = one K→K conv, 1/K init.
  """

  def __init__(self, layers=50, classes=16, shot=1, kshot_trans_dim=2, unsort="bam",
               low_fea="layer2", vgg_gram_resized=True, zoom_factor=8, cls_type="Base",
               pspnet=None):
    """BAM.py:38-130 in registration order (criterion, layer0..4, learner_base, down_query, ...,
    cls_merge, kshot_rw, sigmoid); then freeze_modules (BAM.py:162-174, called by train.py)."""
    super().__init__()
    assert unsort in ("bam", "msanet")
    self.vgg = layers == "vgg"
    self.shot, self.zoom_factor, self.cls_type = shot, zoom_factor, cls_type
    self.unsort, self.low_fea_id, self.vgg_gram_resized = unsort, low_fea[-1], vgg_gram_resized
    self.base_classes = classes - 1
    self.criterion = nn.CrossEntropyLoss(ignore_index=255)
    psp = pspnet if pspnet is not None else RefPSPNet(layers, classes, zoom_factor)
    self.layer0, self.layer1, self.layer2 = psp.layer0, psp.layer1, psp.layer2
    self.layer3, self.layer4 = psp.layer3, psp.layer4
    self.learner_base = nn.Sequential(psp.ppm, psp.cls)
    d = REDUCE_DIM
    fea_dim = 512 + 256 if self.vgg else 1024 + 512
    self.down_query = nn.Sequential(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.down_supp = nn.Sequential(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.init_merge = nn.Sequential(_conv(d * 2 + 1, d, 1), nn.ReLU())
    self.ASPP_meta = ASPP(d)
    self.res1_meta = nn.Sequential(_conv(d * 5, d, 1), nn.ReLU())
    self.res2_meta = nn.Sequential(_conv(d, d, 3), nn.ReLU(), _conv(d, d, 3), nn.ReLU())
    self.cls_meta = nn.Sequential(_conv(d, d, 3), nn.ReLU(), nn.Dropout2d(0.1),
                                  nn.Conv2d(d, 2, kernel_size=1))
    self.gram_merge = _unit_merge_conv()
    self.cls_merge = _unit_merge_conv()
    if shot > 1:
      if kshot_trans_dim == 0:
        self.kshot_rw = nn.Conv2d(shot, shot, kernel_size=1, bias=False)
        self.kshot_rw.weight = nn.Parameter(torch.ones_like(self.kshot_rw.weight) / shot)
      else:
        self.kshot_rw = nn.Sequential(nn.Conv2d(shot, kshot_trans_dim, kernel_size=1), nn.ReLU(),
                                      nn.Conv2d(kshot_trans_dim, shot, kernel_size=1))
    self.sigmoid = nn.Sigmoid()  # registered, unused (BAM.py:130)
    for m in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4, self.learner_base):
      for p in m.parameters():
        p.requires_grad = False

  def train(self, mode=True):
    """nn.Module.train, then every BatchNorm to eval (train.py:286-288, util.fix_bn)."""
    super().train(mode)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eval()
    return self

  def _backbone(self, x, m_full=None):
    """BAM.py:185-192 (query) / 205-214 (support): layer0..4 under no_grad.

    With m_full (B,1,H,W), m = bilinear resize to the layer3 size and layer4 sees layer3 · m.
    Returns ([f0, f1, f2, f3, f4], raw f2, m); VGG: f2 resized to the layer3 size (stride 16).
    """
    with torch.no_grad():
      f0 = self.layer0(x)
      f1 = self.layer1(f0)
      f2 = self.layer2(f1)
      f3 = self.layer3(f2)
      m = None if m_full is None else _resize(m_full, f3.shape[2:])
      f4 = self.layer4(f3 if m is None else f3 * m)
      f2_raw = f2
      if self.vgg:
        f2 = _resize(f2, f3.shape[2:])
    return [f0, f1, f2, f3, f4], f2_raw, m

  def _gram_feature(self, feats, f2_raw):
    """BAM.py:220/223 eval('..._feat_' + low_fea_id) (after the VGG resize unless switched off)."""
    i = int(self.low_fea_id)
    if i == 2 and self.vgg and not self.vgg_gram_resized:
      return f2_raw
    return feats[i]

  def kshot_weights(self, est_val_total):
    """BAM.py:231-238: (B,K,1,1) ψ_k → (softmax weights (B,K,1,1), pre-softmax (B,K,1,1)|None).

    The MLP sees ψ sorted ascending (val1); its outputs are mapped back with gather(idx2) ('bam')
    or gather(idx1.gather(idx2)) = identity ('msanet').
    """
    if self.shot == 1:
      return torch.ones_like(est_val_total), None
    val1, idx1 = est_val_total.sort(1)
    _, idx2 = idx1.sort(1)
    weight = self.kshot_rw(val1)
    weight = weight.gather(1, idx2 if self.unsort == "bam" else idx1.gather(1, idx2))
    return torch.softmax(weight, 1), weight

  def forward(self, x, s_x, s_y, y_m=None, y_b=None, cat_idx=None, train=None):
    """BAM.py:178-332. x (B,3,H,W), s_x (B,K,3,H,W), s_y (B,K,H,W) labels in {0,1,255}.

    ``train`` (default self.training) selects the training-only ensemble rule (BAM.py:294-300:
    the episode's base class cat_idx+1 is left out of base_fg; ``cat_idx`` is the loader's
    ``subcls``, a list whose element 0 is a (B,) tensor, or that (B,) tensor itself). Dropout
    follows the module mode. With y_m and y_b the dict also holds the three losses.

    Returns (h×w = layer3 size, 60×60 at 473 ResNet / 30×30 VGG; (Ho,Wo) = out_size(H, W)):
      final, meta (B,2,Ho,Wo), base (B,C,Ho,Wo); final_lo, meta_lo (B,2,h,w), base_lo (B,C,h,w);
      pred = final.argmax(1) (the official training return);
      query_feat (B,256,h,w) down_query output; supp_feat [K × (B,256,h,w)] down_supp outputs;
      query_layers / supp_layers: [f0..f4] of the query / of each shot (support f4 = layer4 of
      layer3·m); supp_masks [K × (B,1,h,w)] (m); shot_prototypes [K × (B,256,1,1)];
      prototype (B,256,1,1) (w-weighted); shot_priors [K × (B,1,h,w)]; prior (B,1,h,w)
      (w-weighted); query_gram (B,Cg,Cg); shot_psi (B,K,1,1) ψ_k; psi (B,1,1,1) = Σ w_k ψ_k;
      kshot_logits (B,K,1,1) or None; weights (B,K,1,1) w; merge_feat (B,256,h,w) init_merge
      output; meta_feat (B,256,h,w) res2+res1; base_fg (B,1,h,w); meta_bg, meta_fg (B,1,h,w)
      after gram_merge; merge_bg (B,1,h,w) after cls_merge.
    """
    train = self.training if train is None else train
    bs = x.shape[0]
    h, w = out_size(x.shape[2], x.shape[3], self.zoom_factor)

    # Query feature (BAM.py:185-195).
    q_layers, q2_raw, _ = self._backbone(x)
    q2, q3, q4 = q_layers[2], q_layers[3], q_layers[4]
    query_feat = self.down_query(torch.cat([q3, q2], 1))

    # Support features and per-shot prototypes (BAM.py:198-220).
    protos, supp_feats, s_layers, masks_full, masks, gram_feats = [], [], [], [], [], []
    for i in range(self.shot):
      m_full = (s_y[:, i, :, :] == 1).to(x.dtype).unsqueeze(1)
      masks_full.append(m_full)
      layers, s2_raw, m = self._backbone(s_x[:, i, :, :, :], m_full)
      s_layers.append(layers)
      masks.append(m)
      feat = self.down_supp(torch.cat([layers[3], layers[2]], 1))
      supp_feats.append(feat)
      protos.append(weighted_gap(feat, m))
      gram_feats.append(self._gram_feature(layers, s2_raw))

    # Adjustment factor ψ per shot and k-shot weights (BAM.py:223-239).
    que_gram = gram_matrix(self._gram_feature(q_layers, q2_raw))
    norm_max = torch.ones_like(que_gram).norm(dim=(1, 2))
    est_val_total = torch.cat(
        [((que_gram - gram_matrix(f)).norm(dim=(1, 2)) / norm_max).reshape(bs, 1, 1, 1)
         for f in gram_feats], 1)
    weight_soft, weight = self.kshot_weights(est_val_total)
    est_val = (weight_soft * est_val_total).sum(1, True)

    # Prior per shot (support layer4 of layer3·m, times m4) and its weighted sum (BAM.py:242-269).
    priors = [prior_mask(q4, s_layers[i][4], masks_full[i], q3.shape[2:])
              for i in range(self.shot)]
    prior = (weight_soft * torch.cat(priors, 1)).sum(1, True)

    # Weighted prototype, tile & cat, init_merge (BAM.py:272-278).
    supp_pro = (weight_soft.permute(0, 2, 1, 3) * torch.cat(protos, 2)).sum(2, True)
    merge_feat = self.init_merge(
        torch.cat([query_feat, supp_pro.expand_as(query_feat), prior], 1))

    # Base and meta (BAM.py:281-289).
    base_out = self.learner_base(q4)
    query_meta = self.res1_meta(self.ASPP_meta(merge_feat))
    query_meta = self.res2_meta(query_meta) + query_meta
    meta_out = self.cls_meta(query_meta)
    meta_out_soft = meta_out.softmax(1)
    base_out_soft = base_out.softmax(1)

    # Ensemble (BAM.py:292-317).
    meta_map_bg, meta_map_fg = meta_out_soft[:, 0:1, :, :], meta_out_soft[:, 1:, :, :]
    if train and self.cls_type == "Base":
      ids = cat_idx[0] if isinstance(cat_idx, (list, tuple)) else cat_idx
      c_id_array = torch.arange(self.base_classes + 1, device=x.device)
      base_map_list = []
      for b_id in range(bs):
        c_mask = (c_id_array != 0) & (c_id_array != ids[b_id] + 1)
        base_map_list.append(base_out_soft[b_id, c_mask, :, :].unsqueeze(0).sum(1, True))
      base_map = torch.cat(base_map_list, 0)
    else:
      base_map = base_out_soft[:, 1:, :, :].sum(1, True)
    est_map = est_val.expand_as(meta_map_fg)
    meta_map_bg = self.gram_merge(torch.cat([meta_map_bg, est_map], 1))
    meta_map_fg = self.gram_merge(torch.cat([meta_map_fg, est_map], 1))
    merge_bg = self.cls_merge(torch.cat([meta_map_bg, base_map], 1))
    final_out = torch.cat([merge_bg, meta_map_fg], 1)

    # Output (BAM.py:320-323).
    if self.zoom_factor != 1:
      meta_up, base_up, final_up = (_resize(t, (h, w)) for t in (meta_out, base_out, final_out))
    else:
      meta_up, base_up, final_up = meta_out, base_out, final_out

    out = {"final": final_up, "meta": meta_up, "base": base_up, "final_lo": final_out,
           "meta_lo": meta_out, "base_lo": base_out, "pred": final_up.max(1)[1],
           "query_feat": query_feat, "supp_feat": supp_feats, "query_layers": q_layers,
           "supp_layers": s_layers, "supp_masks": masks, "shot_prototypes": protos,
           "prototype": supp_pro, "shot_priors": priors, "prior": prior, "query_gram": que_gram,
           "shot_psi": est_val_total, "psi": est_val, "kshot_logits": weight,
           "weights": weight_soft, "merge_feat": merge_feat, "meta_feat": query_meta,
           "base_fg": base_map, "meta_bg": meta_map_bg, "meta_fg": meta_map_fg,
           "merge_bg": merge_bg}
    if y_m is not None and y_b is not None:
      out["main_loss"], out["aux_loss1"], out["aux_loss2"] = bam_loss(out, y_m, y_b)
    return out


def bam_loss(out, y_m, y_b):
  """BAM.py:326-329: (CE(final, y_m), CE(meta, y_m), CE(base, y_b)), ignore 255, upsampled maps.

  train.py:311 sums them as main + aux_weight1·aux1 + aux_weight2·aux2 (both weights 1.0).
  """
  ce = nn.CrossEntropyLoss(ignore_index=255)
  y_m, y_b = y_m.long(), y_b.long()
  return ce(out["final"], y_m), ce(out["meta"], y_m), ce(out["base"], y_b)


def bam_total_loss(out, y_m, y_b, aux_weight1=1.0, aux_weight2=1.0):
  """train.py:311: main_loss + aux_weight1·aux_loss1 + aux_weight2·aux_loss2."""
  main, aux1, aux2 = bam_loss(out, y_m, y_b)
  return main + aux_weight1 * aux1 + aux_weight2 * aux2
