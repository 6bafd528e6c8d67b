"""Every OXE registry entry against a tiny episode written in its dataset's published feature layout.

The layouts below are the published TFDS feature specs (tensorflow.org/datasets/catalog/<name>, the OXE
`features.json` files; openvla's additions for fmb / dobbe / droid) reduced to the features an entry
reads plus the step flags, with 4x4 images under the published image keys. The expected standardized
state and action are computed here from the raw values the way octo standardizes them
(`oxe_standardization_transforms.py` and the 8-dim `state_obs_keys` of `oxe_dataset_configs.py` at
octo commit cab7f94, the last with explicit state layouts; openvla's `transforms.py` / `configs.py` for
fmb, dobbe, droid), so an entry that drops, reorders or mis-pads a column, or converts a gripper
differently, fails here. The deliberate differences listed in registry.py's docstring are marked where
they apply.
"""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from m2vla_jax.data import oxe, pipeline, testing
from m2vla_jax.data.oxe import registry
from m2vla_jax.data.rlds import load_dataset

T = 7          # steps in the episode
F32 = np.float32


def t(*shape, dtype=np.float32, zlib=False):
  return ("tensor", tuple(shape), np.dtype(dtype), zlib)


IMG, TEXT = ("image",), ("text",)
WV, RD = t(3), t(3)   # world_vector, rotation_delta


# --- raw value generators for the gripper-carrying columns (the rest are standard normal) -----------
def _choice(*values, dtype=np.float32):
  return lambda rng, shape: rng.choice(np.asarray(values, dtype), size=shape)


# Relative commands including exactly +-0.1 in float32: octo's strict tf comparison reads them as 'keep'.
RELATIVE = _choice(-1.0, 0.0, 1.0, 0.1, -0.1, 0.05, 0.7)
SIGN = _choice(-1.0, 1.0)
BINARY = _choice(0.0, 1.0)
# Continuous bridge gripper, with the float32 thresholds themselves.
BRIDGE_GRIPPER = _choice(0.0, 0.02, 0.5, 0.97, 1.0, 0.95, 0.05, 0.3)


def _unit_quats(rng, shape):
  q = rng.normal(size=shape)
  return (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(F32)


def _with_cols(base, cols):
  """Generator: standard normal of `shape`, then columns {index or (start, stop): generator} replaced."""
  def gen(rng, shape):
    x = rng.normal(size=shape).astype(base)
    for c, g in cols.items():
      sl = slice(*c) if isinstance(c, tuple) else slice(c, c + 1)
      x[..., sl] = g(rng, x[..., sl].shape)
    return x
  return gen


FLAGS = {"is_first": t(dtype=bool), "is_last": t(dtype=bool), "is_terminal": t(dtype=bool)}

# name -> (step features, {flat feature key: generator}); shapes / dtypes as published.
LAYOUTS = {
    "bridge_dataset": ({"observation": {"image_0": IMG, "image_1": IMG, "state": t(7)}, "action": t(7),
                        "language_instruction": TEXT},
                       {"action": _with_cols(F32, {6: BRIDGE_GRIPPER})}),
    "bridge": ({"observation": {"image": IMG, "state": t(7), "natural_language_instruction": TEXT},
                "action": {"world_vector": WV, "rotation_delta": RD, "open_gripper": t(dtype=bool),
                           "terminate_episode": t()}}, {}),
    "fractal20220817_data": ({"observation": {"image": IMG, "base_pose_tool_reached": t(7),
                                              "gripper_closed": t(1), "natural_language_instruction": TEXT},
                              "action": {"world_vector": WV, "rotation_delta": RD,
                                         "gripper_closedness_action": t(1),
                                         "terminate_episode": t(3, dtype=np.int32)}},
                             {"action/gripper_closedness_action": RELATIVE}),
    # kuka's pose / gripper / height are float32 Tensors with TFDS's zlib encoding (published
    # features.json: "encoding": "zlib"); TFDS decoding hands our reader float32 arrays.
    "kuka": ({"observation": {"image": IMG, "clip_function_input/base_pose_tool_reached": t(7, zlib=True),
                              "gripper_closed": t(1, zlib=True), "height_to_bottom": t(1, zlib=True),
                              "natural_language_instruction": TEXT},
              "action": {"world_vector": WV, "rotation_delta": RD, "gripper_closedness_action": t(1),
                         "terminate_episode": t(3, dtype=np.int32)}},
             {"action/gripper_closedness_action": RELATIVE}),
    "taco_play": ({"observation": {"rgb_static": IMG, "rgb_gripper": IMG, "robot_obs": t(15),
                                   "natural_language_instruction": TEXT},
                   "action": {"rel_actions_world": t(7), "rel_actions_gripper": t(7), "actions": t(7),
                              "terminate_episode": t()}},
                  {"action/rel_actions_world": _with_cols(F32, {6: SIGN})}),
    "jaco_play": ({"observation": {"image": IMG, "image_wrist": IMG, "end_effector_cartesian_pos": t(7),
                                   "natural_language_instruction": TEXT},
                   "action": {"world_vector": WV, "gripper_closedness_action": t(1),
                              "terminate_episode": t(3, dtype=np.int32)}},
                  {"action/gripper_closedness_action": RELATIVE}),
    "berkeley_cable_routing": ({"observation": {"image": IMG, "top_image": IMG, "wrist45_image": IMG,
                                                "robot_state": t(7), "natural_language_instruction": TEXT},
                                "action": {"world_vector": WV, "rotation_delta": RD,
                                           "terminate_episode": t()}}, {}),
    "roboturk": ({"observation": {"front_rgb": IMG, "natural_language_instruction": TEXT},
                  "action": {"world_vector": WV, "rotation_delta": RD, "gripper_closedness_action": t(1),
                             "terminate_episode": t()}},
                 {"action/gripper_closedness_action": _choice(-1.0, 0.0, 1.0)}),
    "viola": ({"observation": {"agentview_rgb": IMG, "eye_in_hand_rgb": IMG, "joint_states": t(7),
                               "gripper_states": t(1), "natural_language_instruction": TEXT},
               "action": {"world_vector": WV, "rotation_delta": RD, "gripper_closedness_action": t(),
                          "terminate_episode": t()}},
              {"action/gripper_closedness_action": SIGN}),
    "toto": ({"observation": {"image": IMG, "state": t(7), "natural_language_instruction": TEXT},
              "action": {"world_vector": WV, "rotation_delta": RD, "open_gripper": t(dtype=bool),
                         "terminate_episode": t()}}, {}),
    "language_table": ({"observation": {"rgb": IMG, "effector_translation": t(2),
                                        "instruction": t(512, dtype=np.int32)},
                        "action": t(2)}, {}),
    "stanford_hydra_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(27)}, "action": t(7),
         "language_instruction": TEXT}, {"action": _with_cols(F32, {6: BINARY})}),
    "austin_buds_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(24)}, "action": t(7),
         "language_instruction": TEXT}, {"action": _with_cols(F32, {6: SIGN})}),
    "austin_sailor_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(8)}, "action": t(7),
         "language_instruction": TEXT}, {"action": _with_cols(F32, {6: SIGN})}),
    "austin_sirius_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(8)}, "action": t(7),
         "language_instruction": TEXT}, {"action": _with_cols(F32, {6: SIGN})}),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "image_additional_view": IMG, "state": t(13)}, "action": t(15),
         "language_instruction": TEXT}, {"action": _with_cols(F32, {13: SIGN})}),
    "furniture_bench_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(35)}, "action": t(8),
         "language_instruction": TEXT},
        {"action": _with_cols(F32, {(3, 7): _unit_quats, 7: SIGN})}),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "state": t(21)}, "action": t(8), "language_instruction": TEXT},
        {"action": _with_cols(F32, {6: BINARY, 7: BINARY})}),
    "berkeley_fanuc_manipulation": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(13)}, "action": t(6),
         "language_instruction": TEXT}, {"observation/state": _with_cols(F32, {6: BINARY})}),
    "cmu_stretch": ({"observation": {"image": IMG, "state": t(4)}, "action": t(8),
                     "language_instruction": TEXT}, {"action": _with_cols(F32, {6: BINARY})}),
    "dlr_edan_shared_control_converted_externally_to_rlds": (
        {"observation": {"image": IMG, "state": t(7)}, "action": t(7), "language_instruction": TEXT},
        {"action": _with_cols(F32, {6: BINARY})}),
    "fmb_dataset": ({"observation": {"image_side_1": IMG, "image_side_2": IMG, "image_wrist_1": IMG,
                                     "eef_pose": t(7), "state_gripper_pose": t()},
                     "action": t(7), "language_instruction": TEXT},
                    {"action": _with_cols(F32, {6: BINARY})}),
    "dobbe": ({"observation": {"wrist_image": IMG, "state": t(7)}, "action": t(7),
               "language_instruction": TEXT}, {"action": _with_cols(F32, {6: BINARY})}),
    "droid": ({"observation": {"exterior_image_1_left": IMG, "exterior_image_2_left": IMG,
                               "wrist_image_left": IMG, "cartesian_position": t(6, dtype=np.float64),
                               "gripper_position": t(1, dtype=np.float64)},
               "action_dict": {"cartesian_velocity": t(6, dtype=np.float64),
                               "gripper_position": t(1, dtype=np.float64)},
               "action": t(7, dtype=np.float64), "language_instruction": TEXT},
              {"action_dict/gripper_position": lambda rng, shape: rng.uniform(0, 1, shape)}),
    # openvla's modified_libero_rlds (its builder's features: joint_state is published, never read).
    **{f"libero_{suite}_no_noops": (
        {"observation": {"image": IMG, "wrist_image": IMG, "state": t(8), "joint_state": t(7)},
         "action": t(7), "language_instruction": TEXT}, {"action": _with_cols(F32, {6: SIGN})})
       for suite in ("spatial", "object", "goal", "10")},
}


# --- octo's standardization, written out per dataset over the flat raw arrays -----------------------
def octo_rel2abs(g):
  """octo `rel2abs_gripper_actions`: float32 comparisons, carry from the first command's opposite."""
  g = np.asarray(g, F32)
  thr = np.where(g < F32(-0.1), 1, np.where(g > F32(0.1), -1, 0))
  first = thr[np.argmax(thr != 0)]
  carry = -first if first != 0 else 1
  out = []
  for v in thr:
    carry = v if v != 0 else carry
    out.append(carry)
  return np.asarray(out, np.float64) / 2 + 0.5


def octo_binarize(g):
  """octo `binarize_gripper_actions`: reverse scan from the raw last value, float32 thresholds."""
  g = np.asarray(g, F32)
  out, carry = np.empty(len(g)), float(g[-1])
  for i in range(len(g) - 1, -1, -1):
    if g[i] > F32(0.95) or g[i] < F32(0.05):
      carry = float(g[i] > F32(0.95))
    out[i] = carry
  return out


def clip01(x):
  return np.clip(x, 0, 1)


def cat(*xs):
  return np.concatenate([np.asarray(x, np.float64).reshape(T, -1) for x in xs], 1)


Z = lambda n=1: np.zeros((T, n))   # octo's None state key (one zero column each) / zeros_like


def octo_reference(name, x):
  """(state [T, 8], action [T, 7]) as octo (openvla for fmb / dobbe / droid) standardizes `x`."""
  o = lambda k: x[f"observation/{k}"]
  a = lambda k=None: x["action" if k is None else f"action/{k}"]
  rt1 = lambda: cat(a("world_vector"), a("rotation_delta"),
                    octo_rel2abs(a("gripper_closedness_action")[:, 0]))
  inv_clip = lambda g: 1 - clip01(g)
  if name == "bridge_dataset":
    # Octo also relabels the 6 movement dims with state differences (dropping the last step); the
    # registry keeps the commanded deltas (registry.py docstring). Layout and gripper are octo's.
    s = o("state")
    return cat(s[:, :6], Z(), s[:, -1:]), cat(a()[:, :6], octo_binarize(a()[:, -1]))
  if name == "bridge":   # not in octo: the same POS_EULER layout as bridge_dataset
    s = o("state")
    return cat(s[:, :6], Z(), s[:, -1:]), cat(a("world_vector"), a("rotation_delta"), a("open_gripper"))
  if name == "fractal20220817_data":
    return cat(o("base_pose_tool_reached"), o("gripper_closed")), rt1()
  if name == "kuka":
    return cat(o("clip_function_input/base_pose_tool_reached"), o("gripper_closed")), rt1()
  if name == "taco_play":
    r, act = o("robot_obs"), a("rel_actions_world")
    return cat(r[:, :6], Z(), r[:, 7:8]), cat(act[:, :6], clip01(act[:, -1:]))
  if name == "jaco_play":
    p = o("end_effector_cartesian_pos")
    return (cat(p[:, :6], Z(), p[:, -1:]),
            cat(a("world_vector"), Z(3), octo_rel2abs(a("gripper_closedness_action")[:, 0])))
  if name == "berkeley_cable_routing":
    return cat(o("robot_state"), Z()), cat(a("world_vector"), a("rotation_delta"), Z())
  if name == "roboturk":
    return Z(8), cat(a("world_vector"), a("rotation_delta"), inv_clip(a("gripper_closedness_action")))
  if name == "viola":
    return (cat(o("joint_states"), o("gripper_states")),
            cat(a("world_vector"), a("rotation_delta"), inv_clip(a("gripper_closedness_action")[:, None])))
  if name == "toto":
    return cat(o("state"), Z()), cat(a("world_vector"), a("rotation_delta"), a("open_gripper"))
  if name == "language_table":
    return cat(o("effector_translation"), Z(6)), cat(a(), Z(2), Z(2), np.ones((T, 1)))
  if name == "stanford_hydra_dataset_converted_externally_to_rlds":
    s = o("state")
    return cat(s[:, :3], s[:, 7:10], Z(), s[:, -3:-2]), cat(a()[:, :6], 1 - a()[:, -1:])
  if name == "austin_buds_dataset_converted_externally_to_rlds":
    return cat(o("state")[:, :8]), cat(a()[:, :6], inv_clip(a()[:, -1:]))
  if name in ("austin_sailor_dataset_converted_externally_to_rlds",
              "austin_sirius_dataset_converted_externally_to_rlds"):
    return cat(o("state")), cat(a()[:, :6], inv_clip(a()[:, -1:]))
  if name == "nyu_franka_play_dataset_converted_externally_to_rlds":
    return cat(o("state")[:, -6:], Z(), Z()), cat(a()[:, -8:-2], clip01(a()[:, -2:-1]))
  if name == "furniture_bench_dataset_converted_externally_to_rlds":
    s, act = o("state"), a()
    euler = Rotation.from_quat(act[:, 3:7].astype(np.float64)).as_euler("xyz")  # tfg from_quaternion
    return cat(s[:, :7], s[:, -1:]), cat(act[:, :3], euler, inv_clip(act[:, -1:]))
  if name == "ucsd_kitchen_dataset_converted_externally_to_rlds":
    return cat(o("state")[:, :7], Z()), cat(a()[:, :-1])
  if name == "berkeley_fanuc_manipulation":
    s = o("state")
    return cat(s[:, :6], Z(), s[:, 6:7]), cat(a(), 1 - s[:, 6:7])
  if name == "cmu_stretch":
    s = o("state")
    return cat(s[:, :3], Z(3), Z(), s[:, -1:]), cat(a()[:, :-1])
  if name == "dlr_edan_shared_control_converted_externally_to_rlds":
    return cat(o("state"), Z()), cat(a()[:, :6], 1 - a()[:, -1:])
  if name == "fmb_dataset":
    return cat(o("eef_pose"), o("state_gripper_pose")[:, None]), cat(a())
  if name == "dobbe":   # openvla: [EEF_state (state[:6]), None, gripper_state (state[-1:])]
    s = o("state")
    return cat(s[:, :6], Z(), s[:, -1:]), cat(a())
  if name == "droid":   # openvla's droid_baseact_transform, plus the POS_EULER pad (registry.py)
    return (cat(o("cartesian_position"), Z(), o("gripper_position")),
            cat(x["action_dict/cartesian_velocity"], 1 - x["action_dict/gripper_position"]))
  if name.startswith("libero_"):   # openvla: [EEF_state (state[:6]), gripper_state (state[-2:])]
    return cat(o("state")[:, :6], o("state")[:, -2:]), cat(a()[:, :6], 1 - clip01(a()[:, 6:]))
  raise KeyError(name)


# --- writing ---------------------------------------------------------------------------------------
def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _nest(flat):
  out = {}
  for key, v in flat.items():
    # Keys written with '/' inside one feature name (kuka's 'clip_function_input/...') stay whole.
    node, parts = out, key.split("/")
    if parts[:2] == ["observation", "clip_function_input"]:
      parts = ["observation", "/".join(parts[1:])]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def _features(tree):
  import tensorflow_datasets as tfds
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out[k] = _features(v)
    elif v[0] == "image":
      out[k] = tfds.features.Image(shape=(4, 4, 3), encoding_format="png")
    elif v[0] == "text":
      out[k] = tfds.features.Text()
    else:
      _, shape, dtype, z = v
      enc = tfds.features.Encoding.ZLIB if z else tfds.features.Encoding.NONE
      out[k] = tfds.features.Tensor(shape=shape, dtype=dtype, encoding=enc)
  return out


def raw_episode(name, seed):
  layout, gens = LAYOUTS[name]
  rng = np.random.default_rng(seed)
  raw = {}
  for key, spec in _flat({**layout, **FLAGS}).items():
    if spec[0] == "image":
      raw[key] = rng.integers(0, 256, (T, 4, 4, 3), dtype=np.uint8)
    elif spec[0] == "text":
      raw[key] = [f"{name} task"] * T
    elif key in gens:
      raw[key] = gens[key](rng, (T,) + spec[1]).astype(spec[2])
    elif spec[2] == np.bool_:
      raw[key] = rng.integers(0, 2, (T,) + spec[1]).astype(bool)
    elif spec[2].kind == "i" and spec[1] == (512,):   # language_table: 0-padded unicode codepoints
      cps = np.zeros((T, 512), np.int32)
      text = np.frombuffer(f"{name} task".encode("utf-32-le"), np.int32)
      cps[:, : len(text)] = text
      raw[key] = cps
    else:
      raw[key] = rng.normal(size=(T,) + spec[1]).astype(spec[2])
  raw["is_first"] = np.arange(T) == 0
  raw["is_last"] = raw["is_terminal"] = np.arange(T) == T - 1
  return raw


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("oxe_layouts"))
  raws = {}
  for k, name in enumerate(sorted(LAYOUTS)):
    layout, _ = LAYOUTS[name]
    raws[name] = raw_episode(name, k)
    testing.write_tfds_episodes(root, name, _features(_nest(_flat({**layout, **FLAGS}))),
                                [{"steps": _nest(raws[name])}])
  return root, raws


def test_every_registry_entry_has_a_published_layout():
  assert sorted(LAYOUTS) == sorted(registry.BUILTIN)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_entry_matches_octo_standardization(written, name):
  root, raws = written
  spec = oxe.get_spec(name)
  ds = load_dataset(root, spec, "train", progress=False)
  assert not ds.skipped and len(ds.episodes) == 1
  ep = ds.episodes[0]
  want_state, want_action = octo_reference(name, raws[name])
  # The OXE mixture contract: state [8] (gripper last where there is one), action [7], gripper at 6.
  assert ep["state"].shape == (T, 8) and ep["action"].shape == (T, 7)
  assert ds.gripper_mask.tolist() == [False] * 6 + [True]
  # Slicing, padding and the 0/1 gripper conversions are exact; furniture's quaternion -> euler is
  # float64 on both sides rounded to float32 (|angle| <= pi: 1 ulp < 1e-6).
  np.testing.assert_allclose(ep["state"], want_state.astype(np.float32), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ep["action"], want_action.astype(np.float32), rtol=0, atol=1e-6)
  assert ep["instruction"] == ([""] * T if spec.instruction_key is None else [f"{name} task"] * T)
  # Padding dims are marked (never normalized) and hold zeros.
  pad = ds.state_padding_mask
  assert pad.shape == (8,) and not ep["state"][:, pad].any()
  assert {slot for slot in ep["images"]} == set(spec.cameras)


def test_mixture_batches_line_up_state_and_gripper_dims(written, tmp_path):
  """In a mixture every dataset's state row is its 8-dim layout: the gripper state sits at index 7 for
  taco_play (robot_obs[7]) as for fractal (gripper_closed), jaco and bridge_dataset."""
  root, raws = written
  names = sorted(["taco_play", "fractal20220817_data", "jaco_play", "bridge_dataset"])
  c = pipeline.get_config()
  c.update(horizon=4, max_tokens=32)   # a policy's geometry; no policy here
  c.update(dict(data_dir=root, datasets=",".join(names), stats_dir=str(tmp_path), progress=False,
                image_size=(4, 4), cameras=("primary",), normalization="none", batch_size=16,
                shuffle_buffer=0, max_tokens=8))
  it = pipeline.make_pipeline(c, tokenizer=testing.ByteTokenizer(), process_index=0, process_count=1)
  assert it.info.state_dim == 8 and it.info.action_dim == 7
  seen = set()
  for _ in range(4):
    b = next(it)
    for k, fid in enumerate(b["frame_id"]):
      name = it.info.datasets[int(it.info.dataset_of(fid))]
      step = int(fid) - it.info.frame_id_ranges[name][0]
      want_state, want_action = octo_reference(name, raws[name])
      np.testing.assert_array_equal(b["observation"]["state"][k], want_state[step].astype(np.float32))
      np.testing.assert_array_equal(b["actions"][k, 0], want_action[step].astype(np.float32))
      seen.add(name)
  assert seen == set(names)


def test_relative_gripper_threshold_cases_are_present():
  """The generated relative commands include float32 +-0.1 (read as 'keep'), so the layout tests above
  pin the threshold rounding for fractal, kuka and jaco."""
  g = RELATIVE(np.random.default_rng(0), (400,))
  assert (g == F32(0.1)).any() and (g == F32(-0.1)).any()
