"""The OXE registry: one `DatasetSpec` per dataset, and named mixtures with sampling weights.

Adding a dataset is one `_register(DatasetSpec(...))` call. Keys are the raw RLDS feature paths of the
published datasets (facts from octo's and openvla's OXE configs; instructions those projects found
uninformative are dropped, `instruction_key=None`). Camera slots: 'primary' (third-person),
'secondary' (second third-person view), 'wrist'.

Layouts, so that a mixture lines dimensions up across datasets (octo's `state_obs_keys` before its
May 2024 release, commit cab7f94, and openvla's `configs.py`: "always 8-dim"; `pad()` is octo's `None`):
  state  [8]: POS_EULER  xyz (3) + roll-pitch-yaw (3) + pad (1) + gripper (1)
              POS_QUAT   xyz (3) + quaternion (4) + gripper (1)
              JOINT      joints (7, padded if fewer) + gripper (1); NONE: 8 pads
  action [7]: deltas (6, zeros where a dataset has none) + absolute gripper (1 = open, 0 = closed)
`tests/data/test_oxe_layouts.py` pins every entry (`BUILTIN`) against a tiny episode written in its
published feature layout. Deliberate differences from octo: bridge_dataset keeps its commanded
movement deltas (octo relabels them with state differences and drops the last step); inverted grippers
are clipped to [0, 1] before inverting (octo skips the clip for hydra, dlr_edan and fanuc, whose
published values are 0/1); droid and dobbe get the POS_EULER pad (openvla concatenates their 7 dims
without it); dobbe's only camera is the 'wrist' slot (openvla calls it primary). LIBERO's entries keep openvla's
8-dim state (xyz, axis-angle, two finger positions), which is what the LIBERO evaluation observes.
"""
from __future__ import annotations

from typing import Mapping

from m2vla_jax.data.errors import DataError
from m2vla_jax.data.oxe.spec import ActionEncoding, DatasetSpec, Field, Gripper

DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
  if spec.name in DATASETS:
    raise ValueError(f"dataset {spec.name!r} registered twice")
  DATASETS[spec.name] = spec


def register(spec: DatasetSpec, *, overwrite: bool = False) -> None:
  """Adds a user entry (e.g. simulator demonstrations written with `write_rlds_dataset`)."""
  if spec.name in DATASETS and not overwrite:
    raise DataError(f"dataset {spec.name!r} is already registered; pass overwrite=True to replace it.")
  DATASETS[spec.name] = spec


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}. Add an entry with "
                    "m2vla_jax.data.oxe.register(DatasetSpec(...)).")
  return DATASETS[name]


F = Field
G = Gripper


def pad(n: int = 1) -> Field:
  """n zero columns: padding (octo's `None` state key; its `zeros_like` action dims). Padding dims are
  marked in the statistics and never normalized."""
  return F(None, size=n)


_RT1_ACTION = (F("action/world_vector"), F("action/rotation_delta"),
               F("action/gripper_closedness_action", gripper=G.RELATIVE))
_NL = "observation/natural_language_instruction"

_register(DatasetSpec(  # Berkeley's own BridgeData v2 release (the octo debug sample)
    "bridge_dataset", {"primary": "image_0", "secondary": "image_1"},
    state=(F("observation/state", 0, 6), pad(), F("observation/state", -1, None)),
    action=(F("action", 0, 6), F("action", 6, 7, gripper=G.BINARIZE))))
_register(DatasetSpec(  # the OXE copy of bridge
    "bridge", {"primary": "image"},
    state=(F("observation/state", 0, 6), pad(), F("observation/state", -1, None)),
    action=(F("action/world_vector"), F("action/rotation_delta"),
            F("action/open_gripper", gripper=G.OPEN_1)),
    instruction_key=_NL))
_register(DatasetSpec(
    "fractal20220817_data", {"primary": "image"},
    state=(F("observation/base_pose_tool_reached"), F("observation/gripper_closed")),
    action=_RT1_ACTION, instruction_key=_NL))
_register(DatasetSpec(
    "kuka", {"primary": "image"},
    state=(F("observation/clip_function_input/base_pose_tool_reached", op="zlib_float32"),
           F("observation/gripper_closed", op="zlib_float32")),
    action=_RT1_ACTION, instruction_key=None))
_register(DatasetSpec(
    "taco_play", {"primary": "rgb_static", "wrist": "rgb_gripper"},
    state=(F("observation/robot_obs", 0, 6), pad(), F("observation/robot_obs", 7, 8)),
    action=(F("action/rel_actions_world", 0, 6),
            F("action/rel_actions_world", 6, 7, gripper=G.CLIP_OPEN_1)),
    instruction_key=_NL))
_register(DatasetSpec(
    "jaco_play", {"primary": "image", "wrist": "image_wrist"},
    state=(F("observation/end_effector_cartesian_pos", 0, 6), pad(),
           F("observation/end_effector_cartesian_pos", -1, None)),
    action=(F("action/world_vector"), pad(3),
            F("action/gripper_closedness_action", gripper=G.RELATIVE)),
    instruction_key=_NL))
_register(DatasetSpec(
    "berkeley_cable_routing", {"primary": "image", "secondary": "top_image", "wrist": "wrist45_image"},
    state=(F("observation/robot_state"), pad()),
    action=(F("action/world_vector"), F("action/rotation_delta"), F(None, size=1, gripper=G.OPEN_1)),
    instruction_key=None))
_register(DatasetSpec(
    "roboturk", {"primary": "front_rgb"}, state=(pad(8),),
    action=(F("action/world_vector"), F("action/rotation_delta"),
            F("action/gripper_closedness_action", gripper=G.CLOSED_1)),
    instruction_key=None))
_register(DatasetSpec(
    "viola", {"primary": "agentview_rgb", "wrist": "eye_in_hand_rgb"},
    state=(F("observation/joint_states"), F("observation/gripper_states")),
    action=(F("action/world_vector"), F("action/rotation_delta"),
            F("action/gripper_closedness_action", gripper=G.CLOSED_1)),
    instruction_key=None))
_register(DatasetSpec(
    "toto", {"primary": "image"}, state=(F("observation/state"), pad()),
    action=(F("action/world_vector"), F("action/rotation_delta"),
            F("action/open_gripper", gripper=G.OPEN_1)),
    action_encoding=ActionEncoding.EEF_DELTA, instruction_key=None))
_register(DatasetSpec(  # 2-D pusher: xy delta, no rotation, gripper always open
    "language_table", {"primary": "rgb"}, state=(F("observation/effector_translation"), pad(6)),
    action=(F("action"), pad(4), F(None, size=1, value=1.0, gripper=G.OPEN_1)),
    instruction_key="observation/instruction", instruction_format="codepoints"))
_register(DatasetSpec(
    "stanford_hydra_dataset_converted_externally_to_rlds", {"primary": "image", "wrist": "wrist_image"},
    state=(F("observation/state", 0, 3), F("observation/state", 7, 10), pad(),
           F("observation/state", -3, -2)),
    action=(F("action", 0, 6), F("action", -1, None, gripper=G.CLOSED_1)),
    instruction_key=None))
for _name, _state in (("austin_buds_dataset_converted_externally_to_rlds", F("observation/state", 0, 8)),
                      ("austin_sailor_dataset_converted_externally_to_rlds", F("observation/state")),
                      ("austin_sirius_dataset_converted_externally_to_rlds", F("observation/state"))):
  _register(DatasetSpec(
      _name, {"primary": "image", "wrist": "wrist_image"}, state=(_state,),
      action=(F("action", 0, 6), F("action", -1, None, gripper=G.CLOSED_1)), instruction_key=None))
_register(DatasetSpec(
    "nyu_franka_play_dataset_converted_externally_to_rlds",
    {"primary": "image", "secondary": "image_additional_view"},
    state=(F("observation/state", -6, None), pad(2)),
    action=(F("action", -8, -2), F("action", -2, -1, gripper=G.CLIP_OPEN_1)), instruction_key=None))
_register(DatasetSpec(
    "furniture_bench_dataset_converted_externally_to_rlds", {"primary": "image", "wrist": "wrist_image"},
    state=(F("observation/state", 0, 7), F("observation/state", -1, None)),
    action=(F("action", 0, 3), F("action", 3, 7, op="quat_to_euler"),
            F("action", -1, None, gripper=G.CLOSED_1))))
_register(DatasetSpec(
    "ucsd_kitchen_dataset_converted_externally_to_rlds", {"primary": "image"},
    state=(F("observation/state", 0, 7), pad()),
    action=(F("action", 0, 6), F("action", 6, 7, gripper=G.OPEN_1))))
_register(DatasetSpec(  # stores no gripper action: the (inverted) gripper state stands in
    "berkeley_fanuc_manipulation", {"primary": "image", "wrist": "wrist_image"},
    state=(F("observation/state", 0, 6), pad(), F("observation/state", 6, 7)),
    action=(F("action"), F("observation/state", 6, 7, gripper=G.CLOSED_1)),
    action_encoding=ActionEncoding.EEF_DELTA))
_register(DatasetSpec(
    "cmu_stretch", {"primary": "image"},
    state=(F("observation/state", 0, 3), pad(3), pad(), F("observation/state", -1, None)),
    action=(F("action", 0, 6), F("action", 6, 7, gripper=G.OPEN_1))))
_register(DatasetSpec(
    "dlr_edan_shared_control_converted_externally_to_rlds", {"primary": "image"},
    state=(F("observation/state"), pad()),
    action=(F("action", 0, 6), F("action", -1, None, gripper=G.CLOSED_1))))
_register(DatasetSpec(
    "fmb_dataset", {"primary": "image_side_1", "secondary": "image_side_2", "wrist": "image_wrist_1"},
    state=(F("observation/eef_pose"), F("observation/state_gripper_pose")),
    action=(F("action", 0, 6), F("action", 6, 7, gripper=G.OPEN_1))))
_register(DatasetSpec(
    "dobbe", {"wrist": "wrist_image"},
    state=(F("observation/state", 0, 6), pad(), F("observation/state", -1, None)),
    action=(F("action", 0, 6), F("action", 6, 7, gripper=G.OPEN_1))))
_register(DatasetSpec(
    "droid", {"primary": "exterior_image_1_left", "secondary": "exterior_image_2_left",
              "wrist": "wrist_image_left"},
    state=(F("observation/cartesian_position"), pad(), F("observation/gripper_position")),
    action=(F("action_dict/cartesian_velocity"),
            F("action_dict/gripper_position", gripper=G.CLOSED_1))))

# LIBERO demonstrations as OpenVLA regenerated them (`modified_libero_rlds`, no-op steps removed; the
# datasets openpi, OpenVLA-OFT and VLA-Adapter train on): 256 px 'image' and 'wrist_image' stored
# rotated by 180 degrees (as `sim/libero/env.py` serves them), state = eef xyz (3) + axis-angle (3) +
# two finger qpos (2) (openvla's [EEF_state, gripper_state], not the POS_EULER layout: the same 8 dims
# the LIBERO evaluation observes), action = OSC deltas (6) + gripper -1 open / +1 close (clipped to
# [0, 1] and inverted, openvla's `libero_dataset_transform`).
for _suite in ("spatial", "object", "goal", "10"):
  _register(DatasetSpec(
      f"libero_{_suite}_no_noops", {"primary": "image", "wrist": "wrist_image"},
      state=(F("observation/state"),),
      action=(F("action", 0, 6), F("action", 6, 7, gripper=G.CLOSED_1))))

BUILTIN: frozenset[str] = frozenset(DATASETS)   # the OXE entries above (not user `register` calls)

# Mixtures: dataset name -> relative sampling weight (normalized by the pipeline; see
# `config.balance_by_size` for weighting by dataset size as octo does).
MIXTURES: dict[str, dict[str, float]] = {
    "bridge": {"bridge_dataset": 1.0},
    "rtx": {
        "fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0,
        "taco_play": 2.0, "jaco_play": 2.0, "berkeley_cable_routing": 3.0, "roboturk": 1.0,
        "viola": 2.0, "toto": 1.0,
    },
    "oxe_magic_soup": {
        "fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0,
        "taco_play": 2.0, "jaco_play": 1.0, "berkeley_cable_routing": 1.0, "roboturk": 2.0,
        "viola": 2.0, "toto": 1.0, "language_table": 0.1,
        "stanford_hydra_dataset_converted_externally_to_rlds": 2.0,
        "austin_buds_dataset_converted_externally_to_rlds": 1.0,
        "nyu_franka_play_dataset_converted_externally_to_rlds": 3.0,
        "furniture_bench_dataset_converted_externally_to_rlds": 0.1,
        "ucsd_kitchen_dataset_converted_externally_to_rlds": 2.0,
        "austin_sailor_dataset_converted_externally_to_rlds": 1.0,
        "austin_sirius_dataset_converted_externally_to_rlds": 1.0,
        "dlr_edan_shared_control_converted_externally_to_rlds": 1.0,
        "berkeley_fanuc_manipulation": 2.0, "cmu_stretch": 1.0,
    },
}
MIXTURES["libero_4_suites"] = {f"libero_{s}_no_noops": 1.0 for s in ("spatial", "object", "goal", "10")}
MIXTURES["oxe_magic_soup_plus"] = {**MIXTURES["oxe_magic_soup"], "fmb_dataset": 1.0, "dobbe": 0.2,
                                   "droid": 0.06}


def resolve_mixture(datasets: str | Mapping[str, float] | list) -> dict[str, float]:
  """A mixture name, 'a,b' (equal weights), 'a:3,b:1', a {name: weight} map or [(name, weight)]
  -> {name: weight}.

  Every name is checked against the registry here, before any file is opened.
  """
  if isinstance(datasets, str):
    if datasets in MIXTURES:
      mix = dict(MIXTURES[datasets])
    else:
      mix = {}
      for item in (x.strip() for x in datasets.split(",")):
        if not item:
          continue
        name, _, weight = item.partition(":")
        try:
          mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
          raise DataError(f"mixture {datasets!r}: weight {weight!r} of {name!r} is not a number.") from None
  elif isinstance(datasets, Mapping):
    mix = {str(k): float(v) for k, v in datasets.items()}
  else:
    mix = {str(k): float(v) for k, v in datasets}
  if not mix:
    raise DataError(f"config.datasets={datasets!r} names no dataset; mixtures: {sorted(MIXTURES)}.")
  for name, w in mix.items():
    if name not in DATASETS:
      raise DataError(f"mixture {datasets!r} names unknown dataset {name!r}; registered: "
                      f"{sorted(DATASETS)}; mixtures: {sorted(MIXTURES)}.")
    if not w > 0:
      raise DataError(f"mixture {datasets!r}: weight of {name!r} must be > 0, got {w}.")
  return mix
