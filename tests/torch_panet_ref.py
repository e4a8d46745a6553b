"""A PyTorch oracle of the reference PANet (kaixin96/PANet@1695bf3), written from the facts.

Used only by the tests: an NCHW transcription of the official ``Encoder`` (``models/vgg.py``) and
``FewShotSeg`` (``models/fewshot.py``) forward with its prototype alignment loss (``alignLoss``),
step by step in the official order (reference_panet.md §1, §5, §6): one concatenated encoder batch
(way 0 shots, way 1 shots, ..., then the queries), a Python loop over the episodes of the batch,
masked average pooling on the features upsampled to the mask size, prototypes averaged over shots
(background over ways and shots), 20·cosine on the feature-resolution query map, logits upsampled
to the image size, and PAR from the argmax of the feature-resolution prediction. The module tree,
and so the state_dict (``encoder.backbone.features.{block}.{index}.*``, 26 tensors, no buffers),
is the official one, so an official snapshot (after stripping ``module.``) loads strictly.

Differences from the official code, none of which changes a float32 number:

- ``forward`` returns a dict: the official outputs (``logits`` = its ``output``, ``align_loss``)
  and the intermediates a parity test needs (see ``FewShotSeg.forward``).
- ``F.interpolate`` gets ``align_corners=False`` explicitly (the official call leaves it unset,
  which means False since PyTorch 0.4.1, with a warning).
- The cosine is the installed PyTorch's ``F.cosine_similarity`` (eps 1e-8), i.e. current PyTorch
  semantics, x·y / (max(‖x‖, eps)·max(‖y‖, eps)), not PyTorch 1.0.1's
  x·y / sqrt(max(‖x‖²‖y‖², eps²)) (reference_panet.md §5). The two differ only when a norm is
  below 1e-8; both give 0 for the zero prototype of an empty mask.
- PAR's query masks are cast to the features' dtype where the official code casts them with
  ``.float()``. Identical in float32 (the only dtype the official code runs in); in a float64
  oracle the official cast would round the pooling denominators (pixel count + 1e-5) to float32,
  which moves the query prototypes by up to ~6e-8 relative (a float32 rounding, no part of the
  computation) but not the loss: the cosine does not see a prototype's scale.
- No ``pretrained_path``: the encoder is built with the official init (Kaiming-normal conv
  weights, fan_in, relu gain; PyTorch's default uniform biases) and ``load_imagenet_positional_``
  applies the official positional ImageNet load to a given state_dict.

No tensor is created with a fixed float dtype: ``model.double()`` gives a float64 oracle.
"""
import collections

import torch
from torch import nn
import torch.nn.functional as F

# (number of convs, in channels, out channels, dilation, last ReLU) of Encoder.features 0, 2, 4,
# 6, 8; the children 1, 3, 5, 7 between them are max-pools with these strides (kernel 3, pad 1).
BLOCKS = ((2, 3, 64, 1, True), (2, 64, 128, 1, True), (3, 128, 256, 1, True),
          (3, 256, 512, 1, True), (3, 512, 512, 2, False))
POOL_STRIDES = (2, 2, 2, 1)
# torchvision vgg16 (no BN) ``features`` indices of the 13 convs, in order: the positional
# ImageNet load copies the file's first 26 tensors (these convs' weight, bias) in this order.
TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# torchvision's classifier.{0,3,6}; the real shapes are (4096, 25088), (4096, 4096), (1000, 4096).
# Nothing reads them (the positional load takes the first 26 tensors, our importer ignores
# ``classifier.``), so the synthetic files use small ones by default.
SMALL_CLASSIFIER_SHAPES = {"0": (16, 8), "3": (16, 16), "6": (10, 16)}
SCALER = 20


def make_layer(n_convs, in_channels, out_channels, dilation=1, last_relu=True):
  """Official ``Encoder._make_layer``: conv(3x3, padding = dilation, bias), ReLU, ...; the last
  ReLU only if ``last_relu``."""
  layer = []
  for i in range(n_convs):
    layer.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, dilation=dilation,
                           padding=dilation))
    if i != n_convs - 1 or last_relu:
      layer.append(nn.ReLU(inplace=True))
    in_channels = out_channels
  return nn.Sequential(*layer)


class Encoder(nn.Module):
  """Official ``Encoder``: ``features`` = block, pool, block, pool, block, pool, block,
  pool (stride 1), dilated block without its last ReLU. (B,3,H,W) → (B,512,h,w), h = ⌈⌈⌈H/2⌉/2⌉/2⌉."""

  def __init__(self, in_channels=3):
    super().__init__()
    mods = []
    for i, (n, cin, cout, dilation, last_relu) in enumerate(BLOCKS):
      mods.append(make_layer(n, in_channels if i == 0 else cin, cout, dilation, last_relu))
      if i < len(POOL_STRIDES):
        mods.append(nn.MaxPool2d(kernel_size=3, stride=POOL_STRIDES[i], padding=1))
    self.features = nn.Sequential(*mods)
    self._init_weights()

  def forward(self, x):
    return self.features(x)

  def layers(self, x):
    """The same children, with fss_jax's cut (``vgg16_panet``): layer k = block 2k and the pool
    after it (layer4: block 8 alone). Returns {'layer0': ..., ..., 'layer4': forward(x)}."""
    out = {}
    for k in range(5):
      x = self.features[2 * k](x)
      if 2 * k + 1 < len(self.features):
        x = self.features[2 * k + 1](x)
      out[f"layer{k}"] = x
    return out

  def _init_weights(self):
    """Official init without ``pretrained_path``: Kaiming-normal conv weights (fan_in, relu);
    biases keep PyTorch's default U(±1/sqrt(fan_in))."""
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def imagenet_state_dict(seed=0, classifier_shapes=None, dtype=torch.float32):
  """A synthetic torchvision ``vgg16`` (no BN) state_dict: its 32 keys in its order
  (``features.{0,2,5,...,28}.{weight,bias}``, then ``classifier.{0,3,6}.{weight,bias}``), random
  values (He-scaled weights, biases N(0, 0.1²)). ``classifier_shapes`` default: small ones."""
  g = torch.Generator().manual_seed(seed)
  out = collections.OrderedDict()
  convs = [(cin if j == 0 else cout, cout) for n, cin, cout, _, _ in BLOCKS for j in range(n)]
  for index, (cin, cout) in zip(TORCHVISION_CONVS, convs):
    out[f"features.{index}.weight"] = (torch.randn((cout, cin, 3, 3), generator=g)
                                       * (2.0 / (9 * cin)) ** 0.5).to(dtype)
    out[f"features.{index}.bias"] = (torch.randn((cout,), generator=g) * 0.1).to(dtype)
  for i, shape in (classifier_shapes or SMALL_CLASSIFIER_SHAPES).items():
    out[f"classifier.{i}.weight"] = (torch.randn(shape, generator=g) * 0.01).to(dtype)
    out[f"classifier.{i}.bias"] = (torch.randn(shape[:1], generator=g) * 0.01).to(dtype)
  return out


def load_imagenet_positional_(encoder, state_dict):
  """The official ImageNet load (``Encoder._init_weights`` with ``pretrained_path``): the first
  26 entries of the file, by position, into the encoder's 26 state_dict entries."""
  keys = list(state_dict.keys())
  new_dic = encoder.state_dict()
  new_keys = list(new_dic.keys())
  for i in range(26):
    new_dic[new_keys[i]] = state_dict[keys[i]]
  encoder.load_state_dict(new_dic)
  return encoder


def cal_dist(fts, prototype, scaler=SCALER):
  """Official ``calDist``: (N,C,h,w), (1,C) → (N,h,w) = scaler · cosine over C."""
  return F.cosine_similarity(fts, prototype[..., None, None], dim=1) * scaler


def get_features(fts, mask):
  """Official ``getFeatures``: (1,C,h,w) features upsampled (bilinear) to the (1,H,W) mask,
  masked average → (1,C) = Σ F↑·M / (Σ M + 1e-5)."""
  fts = F.interpolate(fts, size=mask.shape[-2:], mode="bilinear", align_corners=False)
  masked_fts = torch.sum(fts * mask[None, ...], dim=(2, 3)) \
      / (mask[None, ...].sum(dim=(2, 3)) + 1e-5)
  return masked_fts


def get_prototype(fg_fts, bg_fts):
  """Official ``getPrototype``: fg per way = mean over shots; bg = mean over ways of the mean
  over shots (Python ``sum``, in the official order)."""
  n_ways, n_shots = len(fg_fts), len(fg_fts[0])
  fg_prototypes = [sum(way) / n_shots for way in fg_fts]
  bg_prototype = sum([sum(way) / n_shots for way in bg_fts]) / n_ways
  return fg_prototypes, bg_prototype


def align_loss(qry_fts, pred, supp_fts, fore_mask, back_mask):
  """Official ``alignLoss`` of one episode, returning its intermediates too.

  Args:
    qry_fts (N,C,h,w), pred (N,1+Wa,h,w) feature-resolution scores, supp_fts (Wa,Sh,C,h,w),
    fore_mask / back_mask (Wa,Sh,H,W).
  Returns:
    (loss: the official value, a tensor or the int 0 when every way is skipped,
     {'qry_prototypes': (1+Wa,C), 'skipped': [bool]*Wa,
      'way_terms': [Σ_shots CE/Sh/Wa (0. if skipped)]*Wa, 'ce': [[CE per shot] or None]*Wa,
      'supp_pred': [[(1,2,H,W) support logits] or None]*Wa}).
  """
  n_ways, n_shots = len(fore_mask), len(fore_mask[0])

  pred_mask = pred.argmax(dim=1, keepdim=True)  # N x 1 x h x w
  binary_masks = [pred_mask == i for i in range(1 + n_ways)]
  skip_ways = [i for i in range(n_ways) if binary_masks[i + 1].sum() == 0]
  # The official ``.float()``: the features' dtype here (the same in float32; see the docstring).
  pred_mask = torch.stack(binary_masks, dim=1).to(qry_fts.dtype)  # N x (1+Wa) x 1 x h x w
  qry_prototypes = torch.sum(qry_fts.unsqueeze(1) * pred_mask, dim=(0, 3, 4))
  qry_prototypes = qry_prototypes / (pred_mask.sum((0, 3, 4)) + 1e-5)  # (1+Wa) x C

  loss = 0
  info = {"qry_prototypes": qry_prototypes, "skipped": [w in skip_ways for w in range(n_ways)],
          "way_terms": [], "ce": [], "supp_pred": []}
  for way in range(n_ways):
    if way in skip_ways:
      info["way_terms"].append(0.0)
      info["ce"].append(None)
      info["supp_pred"].append(None)
      continue
    prototypes = [qry_prototypes[[0]], qry_prototypes[[way + 1]]]
    way_term, ces, preds = 0, [], []
    for shot in range(n_shots):
      img_fts = supp_fts[way, [shot]]
      supp_dist = [cal_dist(img_fts, prototype) for prototype in prototypes]
      supp_pred = torch.stack(supp_dist, dim=1)
      supp_pred = F.interpolate(supp_pred, size=fore_mask.shape[-2:], mode="bilinear",
                                align_corners=False)
      # Support target: 255, then 1 on the fg mask, then 0 on the bg mask (written last).
      supp_label = torch.full_like(fore_mask[way, shot], 255).long()
      supp_label[fore_mask[way, shot] == 1] = 1
      supp_label[back_mask[way, shot] == 1] = 0
      ce = F.cross_entropy(supp_pred, supp_label[None, ...], ignore_index=255)
      term = ce / n_shots / n_ways
      loss = loss + term
      way_term = way_term + term
      ces.append(ce)
      preds.append(supp_pred)
    info["way_terms"].append(way_term)
    info["ce"].append(ces)
    info["supp_pred"].append(preds)
  return loss, info


class FewShotSeg(nn.Module):
  """Official ``FewShotSeg`` (``encoder`` = Sequential(backbone=Encoder)); PAR runs when
  ``cfg['align']`` and ``self.training`` (as the official)."""

  def __init__(self, in_channels=3, cfg=None):
    super().__init__()
    self.config = cfg or {"align": False}
    self.encoder = nn.Sequential(collections.OrderedDict([
        ("backbone", Encoder(in_channels)),]))

  def forward(self, supp_imgs, fore_mask, back_mask, qry_imgs):
    """Official forward.

    Args:
      supp_imgs: way x shot x [B,3,H,W] (lists of lists); fore_mask / back_mask: way x shot x
        [B,H,W] float; qry_imgs: N x [B,3,H,W].
    Returns a dict:
      logits       (N·B, 1+Wa, H, W) query-major (the official ``output``), channel 0 background
      align_loss   Σ_episodes PAR / B (the official second output; 0.0 without PAR)
      pred         (B, N, 1+Wa, h, w) feature-resolution scores (20·cosine)
      fg_prototypes (B, Wa, C); bg_prototype (B, C)
      supp_fg_fts, supp_bg_fts  (B, Wa, Sh, C) per-shot masked averages
      supp_fts (Wa, Sh, B, C, h, w), qry_fts (N, B, C, h, w) encoder outputs
      and, when PAR runs: qry_prototypes (B, 1+Wa, C), par_skipped (B, Wa) bool,
      par_terms (B, Wa) each way's Σ_shots CE/Sh/Wa (0 if skipped; Σ_ways = the episode's PAR),
      par_ce (B, Wa, Sh) the support CEs (0 if skipped), par_episode [the episode's PAR].
    """
    n_ways = len(supp_imgs)
    n_shots = len(supp_imgs[0])
    n_queries = len(qry_imgs)
    batch_size = supp_imgs[0][0].shape[0]
    img_size = supp_imgs[0][0].shape[-2:]

    imgs_concat = torch.cat([torch.cat(way, dim=0) for way in supp_imgs]
                            + [torch.cat(qry_imgs, dim=0),], dim=0)
    img_fts = self.encoder(imgs_concat)
    fts_size = img_fts.shape[-2:]

    supp_fts = img_fts[:n_ways * n_shots * batch_size].view(
        n_ways, n_shots, batch_size, -1, *fts_size)  # Wa x Sh x B x C x h x w
    qry_fts = img_fts[n_ways * n_shots * batch_size:].view(
        n_queries, batch_size, -1, *fts_size)  # N x B x C x h x w
    fore_mask = torch.stack([torch.stack(way, dim=0) for way in fore_mask], dim=0)
    back_mask = torch.stack([torch.stack(way, dim=0) for way in back_mask], dim=0)

    run_align = self.config["align"] and self.training
    total_align = 0
    outputs, rec = [], collections.defaultdict(list)
    for epi in range(batch_size):
      supp_fg_fts = [[get_features(supp_fts[way, shot, [epi]], fore_mask[way, shot, [epi]])
                      for shot in range(n_shots)] for way in range(n_ways)]
      supp_bg_fts = [[get_features(supp_fts[way, shot, [epi]], back_mask[way, shot, [epi]])
                      for shot in range(n_shots)] for way in range(n_ways)]

      fg_prototypes, bg_prototype = get_prototype(supp_fg_fts, supp_bg_fts)

      prototypes = [bg_prototype,] + fg_prototypes
      dist = [cal_dist(qry_fts[:, epi], prototype) for prototype in prototypes]
      pred = torch.stack(dist, dim=1)  # N x (1 + Wa) x h x w
      outputs.append(F.interpolate(pred, size=img_size, mode="bilinear", align_corners=False))

      rec["pred"].append(pred)
      rec["fg_prototypes"].append(torch.cat(fg_prototypes, 0))
      rec["bg_prototype"].append(bg_prototype[0])
      rec["supp_fg_fts"].append(torch.stack([torch.cat(w, 0) for w in supp_fg_fts]))
      rec["supp_bg_fts"].append(torch.stack([torch.cat(w, 0) for w in supp_bg_fts]))

      if run_align:
        align_loss_epi, info = align_loss(qry_fts[:, epi], pred, supp_fts[:, :, epi],
                                          fore_mask[:, :, epi], back_mask[:, :, epi])
        total_align += align_loss_epi
        zero = pred.new_zeros(())
        rec["qry_prototypes"].append(info["qry_prototypes"])
        rec["par_skipped"].append(torch.tensor(info["skipped"]))
        rec["par_terms"].append(torch.stack([zero + t for t in info["way_terms"]]))
        rec["par_ce"].append(torch.stack([torch.stack(c) if c is not None else
                                          pred.new_zeros(n_shots) for c in info["ce"]]))
        rec["par_episode"].append(align_loss_epi)

    output = torch.stack(outputs, dim=1)  # N x B x (1 + Wa) x H x W
    output = output.view(-1, *output.shape[2:])
    out = {"logits": output, "align_loss": total_align / batch_size,
           "supp_fts": supp_fts, "qry_fts": qry_fts}
    for k, v in rec.items():
      out[k] = v if k == "par_episode" else torch.stack(v)
    return out


def nested(supp, fore, back, qry):
  """Stacked episode tensors → the official nesting: supp (Wa,Sh,B,3,H,W) → way x shot x
  [B,3,H,W]; fore/back (Wa,Sh,B,H,W) likewise; qry (N,B,3,H,W) → N x [B,3,H,W]."""
  return ([list(w) for w in supp], [list(w) for w in fore], [list(w) for w in back], list(qry))


def total_loss(out, query_labels, align_loss_scaler=1.0):
  """Official training loss (``train.py``): CE(logits, query labels; ignore 255, mean over the
  non-ignored pixels of all N·B queries) + scaler · PAR. ``query_labels`` (N·B,H,W), query-major
  as ``torch.cat`` of the per-query label batches."""
  query_loss = F.cross_entropy(out["logits"], query_labels.long(), ignore_index=255)
  return query_loss + out["align_loss"] * align_loss_scaler
