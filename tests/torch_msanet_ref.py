"""A PyTorch oracle of the reference MSANet stage 2 (AIVResearch/MSANet ``model/MSANet.py``).

Written from the facts (/work/shared/docs/reference_msanet.md, cited "§n"); used only by the parity
tests. MSANet = BAM (PSPNet base learner, prior, weighted prototype, ASPP head, Gram ψ, k-shot
weights, ensemble) + hyper-feature multi-similarity (§5) + the attention module "GAM" (§6) + an
833-channel merge (§7). NCHW throughout. Module registration order, hence the state_dict keys and
their order, is the reference's (§13: 394 / 700 / 155 keys for R50 / R101 / VGG 1-shot, +4 for
K > 1), so a released checkpoint loads strictly. No tensor is created with a fixed dtype:
``model.double()`` gives a float64 oracle (the reference itself keeps its masks in float32).

Line numbers "MSANet.py Lnnn" refer to ``model/MSANet.py`` at AIVResearch/MSANet HEAD ecd5d08
(model code unchanged since bfc64e1); ``feature.py``, ``correlation.py``, ``ASPP.py``, ``PPM.py``,
``PSPNet.py`` are the files of the same commit.

Modes. ``forward(..., train=None)``: ``train`` selects the training-only parts of the computation
(the ensemble's exclusion of the episode's own base class, §8.4); it defaults to
``self.training``. Dropout follows ``self.training`` as in PyTorch, so ``model.eval()`` with
``train=True`` is the training computation with every dropout off. BatchNorm is always in eval
mode (the reference trains stage 2 with ``fix_bn``, §1.2): ``train()`` puts every BN back in eval.
"""

import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_resnet_ref, torch_vgg_ref
from tests.torch_pfenet_ref import prior_mask, weighted_gap

# Bottleneck counts per stage as the reference declares them (MSANet.py L102-L116). VGG's list
# is a nominal grouping of its 7 hyper-features ([conv4_1..3], [conv5_1..3], [layer4]).
NBOTTLENECKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), "vgg": (2, 2, 3, 3, 3, 1)}
# 1-based global bottleneck indices whose pre-ReLU sum is a hyper-feature (R50 3..16, R101 3..33).
FEAT_IDS = {50: tuple(range(3, 17)), 101: tuple(range(3, 34))}
VGG_LOCAL_IDS = (0, 3, 6)  # feature.py extract_feat_vgg: hard-coded, self.feat_ids ignored
COSINE_EPS = 1e-7  # prior and Gram (MSANet.py L307, get_gram_matrix L31-L37)
CORR_EPS = 1e-5  # correlation.py multilayer_correlation


def _seq(*mods):
  return nn.Sequential(*mods)


def _conv(cin, cout, k, bias=False):
  return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _resize(x, size):
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def stack_ids(layers):
  """MSANet.py L120-L122: reversed cumulative stage counts, first three.

  R50 (3, 9, 13), R101 (3, 26, 30), VGG (1, 4, 7): l4 = last s0 hyper maps, l3 = the s1 − s0
  before, l2 = the s2 − s1 before those (earlier ones, ResNet's layer1 map, are unused).
  """
  counts = NBOTTLENECKS[layers]
  out, acc = [], 0
  for c in reversed(counts):
    acc += c
    out.append(acc)
  return tuple(out[:3])


class PPM(nn.Module):
  """model/PPM.py: per bin AdaptiveAvgPool → 1×1 conv (no bias) → BN → ReLU → bilinear (ac) back;
  (B,C,h,w) → (B,2C,h,w) = cat[x, p1, p2, p3, p6]. Keys ``features.{i}.{1.weight, 2.*}``."""

  def __init__(self, in_dim, reduction_dim, bins=(1, 2, 3, 6)):
    super().__init__()
    self.features = nn.ModuleList([
        _seq(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
             nn.BatchNorm2d(reduction_dim), nn.ReLU()) for b in bins])

  def forward(self, x):
    return torch.cat([x] + [_resize(f(x), x.shape[2:]) for f in self.features], 1)


def base_classifier(fea_dim, classes):
  """PSPNet.py ``cls``: 3×3 conv 2·fea_dim→512 (no bias) → BN → ReLU → Dropout2d(0.1) → 1×1 conv
  512→classes (bias). Keys ``0.weight``, ``1.*``, ``4.{weight,bias}``."""
  return _seq(_conv(2 * fea_dim, 512, 3), nn.BatchNorm2d(512), nn.ReLU(), nn.Dropout2d(0.1),
              _conv(512, classes, 1, True))


class ASPP(nn.Module):
  """model/ASPP.py (BAM's): five branches on (B,256,h,w) → (B,1280,h,w), order [global, 1×1, d6,
  d12, d18]; global = mean over the map → 1×1 conv (bias) → ReLU → expand (no interpolation).
  Init as the reference: kaiming_normal_ weights, default biases."""

  def __init__(self, c=256):
    super().__init__()
    self.layer6_0 = _seq(nn.Conv2d(c, c, 1, bias=True), nn.ReLU())
    self.layer6_1 = _seq(nn.Conv2d(c, c, 1, bias=True), nn.ReLU())
    self.layer6_2 = _seq(nn.Conv2d(c, c, 3, padding=6, dilation=6, bias=True), nn.ReLU())
    self.layer6_3 = _seq(nn.Conv2d(c, c, 3, padding=12, dilation=12, bias=True), nn.ReLU())
    self.layer6_4 = _seq(nn.Conv2d(c, c, 3, padding=18, dilation=18, bias=True), nn.ReLU())
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight)

  def forward(self, x):
    size = x.shape[-2:]
    g = self.layer6_0(F.avg_pool2d(x, kernel_size=size)).expand(-1, -1, size[0], size[1])
    return torch.cat([g, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], 1)


class Attention(nn.Module):
  """MSANet.py ``Attention`` (L40-L75), the "GAM" (§6).

  Fs (B,256,h,w) support feature, Ys (B,1,H,W) full-size support mask → g ⊙ Fs (B,256,h,w):
  mask resized with mode 'nearest'; v = adaptive_avg_pool2d(m·Fs, 1) (mean over all h·w, not
  over the mask); g = sigmoid(Dropout(p)(conv(relu(conv(v))))) — element-wise Dropout BEFORE
  the sigmoid. Keys ``gate.0.*``, ``gate.2.*``.
  """

  def __init__(self, in_channels=256, drop_rate=0.5):
    super().__init__()
    self.gate = _seq(nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(),
                     nn.Conv2d(in_channels, in_channels, 1), nn.Dropout(p=drop_rate), nn.Sigmoid())

  def forward(self, fs, ys):
    m = F.interpolate(ys, size=fs.shape[-2:], mode="nearest")
    return self.gate(F.adaptive_avg_pool2d(m * fs, (1, 1))) * fs


def gram_matrix(fea):
  """MSANet.py ``get_gram_matrix``: (B,C,h,w) → (B,C,C), ⟨f_i,f_j⟩ / (‖f_i‖‖f_j‖ + 1e-7)."""
  b, c, h, w = fea.shape
  fea = fea.reshape(b, c, h * w)
  fea_t = fea.permute(0, 2, 1)
  return torch.bmm(fea, fea_t) / (torch.bmm(fea.norm(2, 2, True), fea_t.norm(2, 1, True))
                                  + COSINE_EPS)


def chain_masks(m_full, sizes):
  """The mask chain of MSANet.py ``mask_feature`` (L399-L407), §5.1 step 1.

  m_full (B,1,H,W); sizes = the (h, w) of every hyper-feature in order. The mask is first resized
  to (2·w0, 2·w0) (w0 = width of the first hyper-feature: ResNet layer1, VGG conv4), then, feature
  by feature, resized to the feature's size whenever its width differs from the current mask's
  (the variable is overwritten: 2w0 → w0 → w2 ...). All bilinear, align_corners=True.
  Returns one mask (B,1,h,w) per feature (the same tensor for features of one resolution).
  """
  w0 = sizes[0][1]
  m = _resize(m_full, (2 * w0, 2 * w0))
  out = []
  for size in sizes:
    if m.shape[-1] != size[1]:
      m = _resize(m, size)
    out.append(m)
  return out


def select_support(feat, mask):
  """MSANet.py ``mask_feature`` L408-L418 (§5.1 steps 2-3), one feature.

  feat (B,C,h,w), mask (B,1,h,w) → (list over b of (C, N_b), list of N_b before the fallback):
  f·m per pixel; μ = mean of the mask values > 0; keep the columns with m ≥ μ (N_b is data-
  dependent); an all-zero mask gives one zero column (C, 1) instead (the NaN μ is never used).
  """
  out, counts = [], []
  for i in range(feat.shape[0]):
    f = feat[i].flatten(start_dim=1)
    m = mask[i].flatten(start_dim=1)
    f = f * m
    m = m.squeeze()
    sel = f[:, m >= m[m > 0].mean()]
    counts.append(sel.shape[1])
    if m.sum() == 0:
      sel = f.new_zeros(f.shape[0], 1)
    out.append(sel)
  return out, counts


def correlation(query, supports):
  """correlation.py ``multilayer_correlation`` inner loop, one feature.

  query (B,C,h,w), supports = list over b of (C, N_b) → (B,1,h,w): per pixel / kept column
  x / (‖x‖₂ + 1e-5) over channels, cosine matrix (hw × N_b), clamp at 0, mean over the N_b columns.
  """
  out = []
  for j, sup in enumerate(supports):
    q = query[j].flatten(start_dim=1)
    qn = q / (q.norm(dim=0, p=2, keepdim=True) + CORR_EPS)
    sn = sup / (sup.norm(dim=0, p=2, keepdim=True) + CORR_EPS)
    c = qn.permute(1, 0).matmul(sn).clamp(min=0).mean(dim=1, keepdim=True)
    out.append(c.permute(1, 0).unsqueeze(0))
  out = torch.cat(out, dim=0)
  return out.reshape(out.shape[0], out.shape[1], query.shape[-2], query.shape[-1])


class RefMSANet(nn.Module):
  """Reference MSANet ``OneModel`` (stage 2); ``forward`` returns a dict (see ``forward``).

  layers: 50 | 101 | 'vgg'; classes: the base learner's classes (16 PASCAL, 61 COCO; the
  reference's ``base_classes`` is classes − 1); shot: K; kshot_trans_dim: 2 in every config
  (0 = one K→K conv without bias, initialised 1/K, MSANet.py L183-L192).
  """

  def __init__(self, layers=50, classes=16, shot=1, kshot_trans_dim=2):
    super().__init__()
    self.vgg = layers == "vgg"
    self.layers_id, self.shot, self.classes = layers, shot, classes
    self.base_classes = classes - 1
    self.stack_ids = stack_ids(layers)
    # Registration order = MSANet.py __init__ (L124-L200): layer0..4, learner_base, down_query,
    # down_supp, init_merge, ASPP_meta, res1_meta, res2_meta, cls_meta, gram_merge, cls_merge,
    # kshot_rw (K > 1), sigmoid, gam, hyper_final.
    bb = torch_vgg_ref.VGG16BN() if self.vgg else torch_resnet_ref.DeepStemResNet(layers)
    self.layer0, self.layer1, self.layer2 = bb.layer0, bb.layer1, bb.layer2
    self.layer3, self.layer4 = bb.layer3, bb.layer4
    fea_dim4 = 512 if self.vgg else 2048
    self.learner_base = _seq(PPM(fea_dim4, fea_dim4 // 4), base_classifier(fea_dim4, classes))
    d, fea_dim = 256, (512 + 256 if self.vgg else 1024 + 512)
    self.down_query = _seq(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.down_supp = _seq(_conv(fea_dim, d, 1), nn.ReLU(), nn.Dropout2d(0.5))
    self.init_merge = _seq(_conv(2 * d + 256 + 64 + 1, d, 1), nn.ReLU())  # 833 → 256
    self.ASPP_meta = ASPP(d)
    self.res1_meta = _seq(_conv(5 * d, d, 1), nn.ReLU())
    self.res2_meta = _seq(_conv(d, d, 3), nn.ReLU(), _conv(d, d, 3), nn.ReLU())
    self.cls_meta = _seq(_conv(d, d, 3), nn.ReLU(), nn.Dropout2d(0.1), _conv(d, 2, 1, True))
    self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
    self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():  # reference init (1, 0): meta alone, then meta alone
      for m in (self.gram_merge, self.cls_merge):
        m.weight.copy_(torch.tensor([1.0, 0.0]).reshape_as(m.weight))
    if shot > 1:
      if kshot_trans_dim == 0:
        self.kshot_rw = nn.Conv2d(shot, shot, 1, bias=False)
        with torch.no_grad():
          self.kshot_rw.weight.fill_(1.0 / shot)
      else:
        self.kshot_rw = _seq(nn.Conv2d(shot, kshot_trans_dim, 1), nn.ReLU(),
                             nn.Conv2d(kshot_trans_dim, shot, 1))
    self.sigmoid = nn.Sigmoid()  # registered (no state), unused, as in the reference
    self.gam = Attention(d)
    c_hyper = sum(NBOTTLENECKS[layers][-3:])  # 13 / 30 / 7
    self.hyper_final = _seq(nn.Conv2d(c_hyper, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
    self.freeze_modules()
    self.train(self.training)

  def freeze_modules(self):
    """MSANet.py L202-L214 (called by the training script): no gradient for layer0..4 and
    learner_base; the trainable rest is 5,131,782 (R50) / 5,132,870 (R101) / 4,738,182 (VGG)
    parameters for K = 1, +27 for K = 5 (§13)."""
    for name in ("layer0", "layer1", "layer2", "layer3", "layer4", "learner_base"):
      for p in getattr(self, name).parameters():
        p.requires_grad = False

  def train(self, mode=True):
    """As nn.Module.train, then every BatchNorm back in eval mode (the reference's ``fix_bn``)."""
    super().train(mode)
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eval()
    return self

  # ------------------------------------------------------------------------------- backbone
  def extract_feats(self, x):
    """feature.py ``extract_feat_res`` / ``extract_feat_vgg`` (no gradient).

    Returns (feats, layers). layers = [layer0..layer4] outputs (those of the plain module calls).
    ResNet: layer0 as a module, then every bottleneck by hand; the PRE-ReLU sum
    bn3(conv3(·)) + identity/downsample is a hyper-feature when its 1-based global index is in
    FEAT_IDS (R50 14 maps: layer1 block 3, layer2 1-4, layer3 1-6, layer4 1-3; R101 31).
    VGG: layer0-2 as modules; inside layer3 and layer4 the outputs of local modules 0, 3, 6 (the
    raw conv4_x / conv5_x convs, before BN; conv4 at layer2's stride 8, conv5 at stride 16), then
    the layer4 output: 7 maps.
    """
    with torch.no_grad():
      feats = []
      if self.vgg:
        layers = [self.layer0(x)]
        layers.append(self.layer1(layers[-1]))
        layers.append(self.layer2(layers[-1]))
        feat = layers[-1]
        for stage in (self.layer3, self.layer4):
          for lid, module in enumerate(stage):
            feat = module(feat)
            if lid in VGG_LOCAL_IDS:
              feats.append(feat)
          layers.append(feat)
        feats.append(feat)
        return feats, layers
      feat = self.layer0(x)
      layers, hid = [feat], 0
      for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
        for bid, blk in enumerate(stage):
          hid += 1
          out = blk.relu(blk.bn1(blk.conv1(feat)))
          out = blk.relu(blk.bn2(blk.conv2(out)))
          out = blk.bn3(blk.conv3(out))
          res = blk.downsample(feat) if bid == 0 else feat
          out = out + res
          if hid in FEAT_IDS[self.layers_id]:
            feats.append(out)
          feat = blk.relu(out)
        layers.append(feat)
      return feats, layers

  def mid_feature(self, layers):
    """MSANet.py L226-L233 / L249-L257: cat[layer3, layer2] (VGG: layer2 bilinearly resized
    (align_corners) to layer3's size first) → (B, 1536 | 768, h3, w3)."""
    f2 = _resize(layers[2], layers[3].shape[2:]) if self.vgg else layers[2]
    return torch.cat([layers[3], f2], 1)

  # ------------------------------------------------------------------------- hyper / corr
  def shot_hyper(self, query_feats, support_feats, m_full):
    """One shot's multi-similarity (MSANet.py L262-L264: mask_feature + multilayer_correlation).

    Returns ([l4, l3, l2] groups as (B, n, h, w), the chained masks, the kept counts). The mask
    chain runs through every hyper-feature (ResNet's layer1 step included); the correlations of
    the maps no group uses (ResNet's layer1 map) are not computed (the reference computes and
    discards them). l4 = maps[-s0:], l3 = maps[-s1:-s0], l2 = maps[-s2:-s1] (correlation.py).
    """
    s0, s1, s2 = self.stack_ids
    n = len(support_feats)
    masks = chain_masks(m_full, [f.shape[2:] for f in support_feats])
    corrs, counts = [None] * n, [None] * n
    for idx in range(n):
      sups, counts[idx] = select_support(support_feats[idx], masks[idx])
      if idx >= n - s2:
        corrs[idx] = correlation(query_feats[idx], sups)
    groups = [torch.cat(corrs[-s0:], 1), torch.cat(corrs[-s1:-s0], 1),
              torch.cat(corrs[-s2:-s1], 1)]
    return groups, masks, counts

  def combine_hyper(self, shot_groups):
    """MSANet.py L268-L282 → (B, C_h, h3, w3) = cat[l2, l3, l4] over the shots.

    l4, l3 (and ResNet's l2): sequential sum over the shots / K. VGG: l2 = the LAST shot's l2
    group only (variable ``corr``), bilinearly (align_corners) resized to the l3 size.
    """
    k = len(shot_groups)
    acc = []
    for ly in range(3):
      s = shot_groups[0][ly]
      for g in shot_groups[1:]:
        s = s + g[ly]
      acc.append(s)
    hyper_4, hyper_3 = acc[0] / k, acc[1] / k
    if self.vgg:
      last = shot_groups[-1]
      hyper_2 = _resize(last[2], last[1].shape[2:])
    else:
      hyper_2 = acc[2] / k
    return torch.cat([hyper_2, hyper_3, hyper_4], 1)

  # ------------------------------------------------------------------------------- forward
  def forward(self, x, s_x, s_y, y_m=None, y_b=None, cat_idx=None, train=None):
    """x (B,3,H,W), s_x (B,K,3,H,W), s_y (B,K,H,W) labels {0,1,255}; cat_idx: the episode
    classes' 0-based indices in the base list, (B,) (the reference's ``subcls``, a list whose
    element 0 is that tensor, is accepted too); needed when ``train``. y_m, y_b are unused
    (the loss is ``msanet_loss``). (H−1) % 8 == 0, square inputs (the prior assumes it).

    Output dict (h3 = layer3 size; (h, w) = ((H−1)//8·8+1, (W−1)//8·8+1)):
      final, meta, base: (B,2|2|classes,h,w) upsampled (bilinear, ac), as the reference returns;
      final_low, meta_low, base_low: the same at h3; base_fg (B,1,h3,w3) the ensemble's base map;
      query_feat (B,256,h3,w3); supp_feats: K × (B,256,h3,w3) (down_supp outputs);
      hyper (B,13|30|7,h3,w3): the correlation maps fed to hyper_final (cat[l2, l3, l4]);
      hyper_shots: K × [l4, l3, l2] per-shot groups; hyper_final (B,64,h3,w3);
      support_masks: K × (chained mask per hyper-feature); n_selected: K × per feature × per
      batch element, the kept count N (0 = empty mask, zero-vector fallback);
      gam (B,256,h3,w3) shot mean, gam_shots K × (B,256,h3,w3);
      prior (B,1,h3,w3) weighted, priors K × (B,1,h3,w3);
      prototype (B,256,1,1) weighted, shot_prototypes K × (B,256,1,1);
      psi (B,K,1,1) per shot, psi_combined (B,1,1,1); kshot_weights (B,K,1,1) (ones for K=1);
      merge (B,256,h3,w3) = init_merge output.
    """
    train = self.training if train is None else train
    bs, _, big_h, big_w = x.shape
    out_size = (int((big_h - 1) / 8 * 8 + 1), int((big_w - 1) / 8 * 8 + 1))

    query_feats, q_layers = self.extract_feats(x)  # MSANet.py L222-L233
    query_feat = self.down_query(self.mid_feature(q_layers))

    protos, supp4, masks, supp2, supp_feats = [], [], [], [], []
    shot_groups, chains, counts, gam_shots = [], [], [], []
    gams = 0
    for i in range(self.shot):  # MSANet.py L241-L266
      m_full = (s_y[:, i] == 1).to(x.dtype).unsqueeze(1)
      masks.append(m_full)
      support_feats, s_layers = self.extract_feats(s_x[:, i])
      supp4.append(s_layers[4])
      m3 = _resize(m_full, s_layers[3].shape[2:])
      supp_feat = self.down_supp(self.mid_feature(s_layers))
      supp_feats.append(supp_feat)
      protos.append(weighted_gap(supp_feat, m3))
      supp2.append(s_layers[2])
      groups, chain, count = self.shot_hyper(query_feats, support_feats, m_full)
      shot_groups.append(groups)
      chains.append(chain)
      counts.append(count)
      g = self.gam(supp_feat, m_full)
      gam_shots.append(g)
      gams = gams + g
    gam = gams / self.shot
    hyper = self.combine_hyper(shot_groups)
    hyper_final = self.hyper_final(hyper)

    # Gram ψ and k-shot weights (MSANet.py L286-L304; §8.2-8.3). ψ_k = ‖G(q2) − G(s2_k)‖_F / C
    # with the raw layer2 (VGG too).
    que_gram = gram_matrix(q_layers[2])
    norm_max = torch.ones_like(que_gram).norm(dim=(1, 2))
    psi = torch.cat([((que_gram - gram_matrix(s2)).norm(dim=(1, 2)) / norm_max)
                     .reshape(bs, 1, 1, 1) for s2 in supp2], 1)  # (B, K, 1, 1)
    if self.shot > 1:
      # kshot_rw sees ψ sorted ascending; the reference un-sorts with gather(idx1.gather(idx2)),
      # which is the identity: the output for the j-th smallest ψ weights shot j in INPUT order.
      val1, _ = psi.sort(1)
      weight = torch.softmax(self.kshot_rw(val1), 1)
    else:
      weight = torch.ones_like(psi)
    psi_combined = (weight * psi).sum(1, True)

    # Prior from the UNMASKED support layer4 · m4 (MSANet.py L306-L335), weighted over shots.
    q3_size = q_layers[3].shape[2:]
    priors = [prior_mask(q_layers[4], s4, m_full, q3_size) for s4, m_full in zip(supp4, masks)]
    prior = (weight * torch.cat(priors, 1)).sum(1, True)
    proto = (weight.permute(0, 2, 1, 3) * torch.cat(protos, 2)).sum(2, True)  # L337-L339

    merge = torch.cat([query_feat, proto.expand_as(query_feat), hyper_final, prior, gam], 1)
    merge = self.init_merge(merge)  # 833 → 256 (L343-L346)
    base_out = self.learner_base(q_layers[4])
    meta = self.ASPP_meta(merge)
    meta = self.res1_meta(meta)
    meta = self.res2_meta(meta) + meta
    meta_out = self.cls_meta(meta)

    # Ensemble (MSANet.py L356-L382; §8.4); outputs upsampled as L384-L388.
    meta_soft, base_soft = meta_out.softmax(1), base_out.softmax(1)
    meta_bg, meta_fg = meta_soft[:, 0:1], meta_soft[:, 1:]
    if train:  # cls_type 'Base': the episode's own base class c* = cat_idx + 1 is excluded
      if isinstance(cat_idx, (list, tuple)) and cat_idx and torch.is_tensor(cat_idx[0]):
        cat_idx = cat_idx[0]
      cat_idx = torch.as_tensor(cat_idx)
      c_ids = torch.arange(self.base_classes + 1, device=x.device)
      rows = []
      for b in range(bs):
        c_mask = (c_ids != 0) & (c_ids != cat_idx[b] + 1)
        rows.append(base_soft[b, c_mask].unsqueeze(0).sum(1, True))
      base_fg = torch.cat(rows, 0)
    else:
      base_fg = base_soft[:, 1:].sum(1, True)
    est_map = psi_combined.expand_as(meta_fg)
    meta_bg = self.gram_merge(torch.cat([meta_bg, est_map], 1))
    meta_fg = self.gram_merge(torch.cat([meta_fg, est_map], 1))
    final_out = torch.cat([self.cls_merge(torch.cat([meta_bg, base_fg], 1)), meta_fg], 1)

    return {"final": _resize(final_out, out_size), "meta": _resize(meta_out, out_size),
            "base": _resize(base_out, out_size),
            "final_low": final_out, "meta_low": meta_out, "base_low": base_out,
            "base_fg": base_fg, "query_feat": query_feat, "supp_feats": supp_feats,
            "hyper": hyper, "hyper_shots": shot_groups, "hyper_final": hyper_final,
            "support_masks": chains, "n_selected": counts,
            "gam": gam, "gam_shots": gam_shots, "prior": prior, "priors": priors,
            "prototype": proto, "shot_prototypes": protos, "psi": psi,
            "psi_combined": psi_combined, "kshot_weights": weight, "merge": merge}


def msanet_loss(out, y_m, y_b):
  """MSANet.py L390-L395: (CE(final, y_m), CE(meta, y_m), CE(base, y_b)), ignore 255, on the
  upsampled maps. The reference's total is main + 1.0·aux1 + 1.0·aux2 (§9)."""
  ce = nn.CrossEntropyLoss(ignore_index=255)
  return ce(out["final"], y_m.long()), ce(out["meta"], y_m.long()), ce(out["base"], y_b.long())
