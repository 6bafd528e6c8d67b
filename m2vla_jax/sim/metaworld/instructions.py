"""Natural-language instructions for the Meta-World MT50 tasks.

Owns the instruction text: five paraphrases per task. The first `NUM_TRAIN` paraphrases are the
only ones that appear in demonstrations (training); the remaining ones are held out and used only by
the "paraphrased instructions" evaluation variant, which measures whether a policy follows the
meaning of an instruction rather than memorising its string.
"""
from __future__ import annotations

import numpy as np

NUM_TRAIN = 3

_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "assembly-v3": (
        "put the ring on the peg",
        "pick up the nut and place it over the peg",
        "assemble the ring onto the pole",
        "slide the round nut down onto the post",
        "fit the handle ring around the vertical peg"),
    "basketball-v3": (
        "dunk the basketball into the hoop",
        "pick up the ball and put it in the basket",
        "score the ball in the hoop",
        "lift the ball and drop it through the rim",
        "carry the basketball to the net and release it"),
    "bin-picking-v3": (
        "move the cube from one bin to the other",
        "pick the block out of the left bin and place it in the right bin",
        "transfer the cube between the bins",
        "grab the small box and drop it into the other container",
        "relocate the block to the second bin"),
    "box-close-v3": (
        "close the box with its lid",
        "put the lid on the box",
        "pick up the lid and cover the box",
        "place the cover on top of the container",
        "shut the box by setting its top on it"),
    "button-press-topdown-v3": (
        "press the button from the top",
        "push the button down",
        "press down on the button from above",
        "tap the button vertically downward",
        "push the top-facing button"),
    "button-press-topdown-wall-v3": (
        "press the button from the top behind the wall",
        "push the button down past the wall",
        "press down on the button next to the wall",
        "reach over the wall and push the button downward",
        "tap the walled button from above"),
    "button-press-v3": (
        "press the button",
        "push the button forward",
        "press the button on the front of the box",
        "poke the button horizontally",
        "push in the side-facing button"),
    "button-press-wall-v3": (
        "press the button behind the wall",
        "push the button forward past the wall",
        "press the button next to the wall",
        "reach around the wall and push the button in",
        "poke the button that is shielded by a wall"),
    "coffee-button-v3": (
        "press the button on the coffee machine",
        "push the coffee machine button",
        "start the coffee machine by pressing its button",
        "hit the switch on the espresso maker",
        "turn on the coffee maker with its button"),
    "coffee-pull-v3": (
        "pull the mug away from the coffee machine",
        "take the cup out of the coffee machine",
        "slide the mug out from under the coffee machine",
        "remove the mug from the espresso maker",
        "drag the cup away from the coffee maker"),
    "coffee-push-v3": (
        "push the mug under the coffee machine",
        "slide the cup into the coffee machine",
        "move the mug beneath the coffee spout",
        "place the cup under the espresso maker by pushing it",
        "shove the mug into the coffee maker"),
    "dial-turn-v3": (
        "turn the dial",
        "rotate the dial",
        "spin the knob around",
        "twist the round knob",
        "give the dial a turn"),
    "disassemble-v3": (
        "take the ring off the peg",
        "pick the nut up and off the peg",
        "remove the ring from the pole",
        "lift the round nut free of the post",
        "pull the handle ring up off the vertical peg"),
    "door-close-v3": (
        "close the door",
        "push the door shut",
        "swing the door closed",
        "shut the open door",
        "move the door back into its frame"),
    "door-lock-v3": (
        "lock the door",
        "turn the lock of the door",
        "rotate the door's lock downward",
        "engage the door lock",
        "twist the latch to secure the door"),
    "door-open-v3": (
        "open the door",
        "pull the door open",
        "swing the door open by its handle",
        "grab the handle and open the door",
        "open up the closed door"),
    "door-unlock-v3": (
        "unlock the door",
        "turn the lock of the door to unlock it",
        "rotate the door's lock upward",
        "disengage the door lock",
        "twist the latch to release the door"),
    "hand-insert-v3": (
        "put the block into the hole",
        "insert the object into the hole in the table",
        "push the block into the opening",
        "slide the piece down into the gap in the table",
        "drop the block into the hole"),
    "drawer-close-v3": (
        "close the drawer",
        "push the drawer shut",
        "slide the drawer closed",
        "shut the open drawer",
        "push the drawer back in"),
    "drawer-open-v3": (
        "open the drawer",
        "pull the drawer open",
        "slide the drawer out",
        "grab the handle and pull out the drawer",
        "draw the drawer toward you"),
    "faucet-open-v3": (
        "open the faucet",
        "turn the faucet on",
        "rotate the faucet handle to open it",
        "twist the tap open",
        "turn on the water tap"),
    "faucet-close-v3": (
        "close the faucet",
        "turn the faucet off",
        "rotate the faucet handle to close it",
        "twist the tap shut",
        "turn off the water tap"),
    "hammer-v3": (
        "hammer the nail in",
        "pick up the hammer and drive the nail",
        "use the hammer to hit the nail",
        "strike the peg into the wall with the hammer",
        "knock the nail in using the mallet"),
    "handle-press-side-v3": (
        "press the handle down from the side",
        "push the side handle down",
        "press down on the handle sideways",
        "lower the lever that sticks out to the side",
        "push the sideways handle downward"),
    "handle-press-v3": (
        "press the handle down",
        "push the handle down",
        "press down on the handle",
        "lower the lever all the way",
        "force the handle downward"),
    "handle-pull-side-v3": (
        "pull the handle up from the side",
        "lift the side handle up",
        "pull up on the handle sideways",
        "raise the lever that sticks out to the side",
        "drag the sideways handle upward"),
    "handle-pull-v3": (
        "pull the handle up",
        "lift the handle up",
        "pull up on the handle",
        "raise the lever all the way",
        "draw the handle upward"),
    "lever-pull-v3": (
        "pull the lever up",
        "lift the lever",
        "rotate the lever upward",
        "raise the arm of the lever",
        "swing the lever up"),
    "peg-insert-side-v3": (
        "insert the peg into the hole from the side",
        "pick up the peg and push it into the side hole",
        "put the peg sideways into the hole",
        "slot the stick horizontally into the opening",
        "plug the peg into the hole on the side"),
    "pick-place-wall-v3": (
        "pick up the puck and place it at the goal behind the wall",
        "move the puck over the wall to the target",
        "lift the puck over the wall and put it down at the goal",
        "carry the disc across the barrier to the marked spot",
        "grab the puck, clear the wall and set it on the target"),
    "pick-out-of-hole-v3": (
        "pick the peg out of the hole",
        "lift the peg out of the hole",
        "take the peg out of the hole and hold it up",
        "pull the stick up out of the opening",
        "remove the peg from the hole"),
    "pick-place-v3": (
        "pick up the puck and place it at the goal",
        "move the puck to the target position",
        "grab the puck and put it on the goal",
        "carry the disc to the marked spot",
        "lift the puck and set it down at the target"),
    "plate-slide-v3": (
        "slide the plate into the goal",
        "push the plate into the net",
        "slide the plate forward into the goal",
        "shove the dish into the cage",
        "move the plate into the goal by sliding it"),
    "plate-slide-side-v3": (
        "slide the plate sideways into the goal",
        "push the plate into the net from the side",
        "slide the plate to the side into the goal",
        "shove the dish sideways into the cage",
        "move the plate laterally into the goal"),
    "plate-slide-back-v3": (
        "slide the plate back out of the goal",
        "pull the plate out of the net",
        "slide the plate backward out of the goal",
        "drag the dish back out of the cage",
        "retrieve the plate from the goal by sliding it back"),
    "plate-slide-back-side-v3": (
        "slide the plate sideways out of the goal",
        "pull the plate out of the net from the side",
        "slide the plate to the side out of the goal",
        "drag the dish sideways out of the cage",
        "retrieve the plate from the goal by sliding it laterally"),
    "peg-unplug-side-v3": (
        "unplug the peg from the side",
        "pull the peg out of the hole sideways",
        "remove the peg from the side hole",
        "yank the plug horizontally out of the socket",
        "extract the stick out of the wall"),
    "soccer-v3": (
        "kick the ball into the goal",
        "push the soccer ball into the net",
        "score a goal with the ball",
        "nudge the football into the goal",
        "roll the ball into the net"),
    "stick-push-v3": (
        "use the stick to push the bottle",
        "grab the stick and push the bottle with it",
        "push the container to the goal using the stick",
        "hold the rod and shove the jug forward",
        "move the bottle by pushing it with the stick"),
    "stick-pull-v3": (
        "use the stick to pull the bottle",
        "grab the stick and pull the bottle with it",
        "pull the container to the goal using the stick",
        "hook the jug with the rod and drag it",
        "move the bottle by pulling it with the stick"),
    "push-v3": (
        "push the puck to the goal",
        "slide the puck to the target",
        "push the puck to the target position",
        "nudge the disc along the table to the marked spot",
        "shove the puck over to the goal"),
    "push-wall-v3": (
        "push the puck around the wall to the goal",
        "slide the puck past the wall to the target",
        "push the puck to the goal behind the wall",
        "nudge the disc around the barrier to the marked spot",
        "shove the puck past the obstacle to the goal"),
    "push-back-v3": (
        "push the puck back to the goal",
        "slide the puck backward to the target",
        "pull the puck back to the goal position",
        "nudge the disc toward the robot to the marked spot",
        "move the puck back to the target"),
    "reach-v3": (
        "reach the goal position",
        "move the gripper to the target",
        "reach for the goal",
        "bring the hand to the marked point",
        "put the end effector at the target location"),
    "reach-wall-v3": (
        "reach the goal position behind the wall",
        "move the gripper over the wall to the target",
        "reach for the goal past the wall",
        "bring the hand around the barrier to the marked point",
        "put the end effector at the target beyond the wall"),
    "shelf-place-v3": (
        "place the block on the shelf",
        "pick up the cube and put it on the shelf",
        "put the block onto the shelf",
        "set the box down on the rack",
        "move the cube up onto the shelf"),
    "sweep-into-v3": (
        "sweep the puck into the hole",
        "push the puck into the hole",
        "sweep the block into the opening",
        "brush the cube into the gap in the table",
        "slide the puck into the hole"),
    "sweep-v3": (
        "sweep the puck off the table",
        "push the puck off the edge of the table",
        "sweep the block off the table",
        "brush the cube over the table edge",
        "slide the puck off the side of the table"),
    "window-open-v3": (
        "open the window",
        "slide the window open",
        "push the window open sideways",
        "slide the window pane to open it",
        "move the sliding window open"),
    "window-close-v3": (
        "close the window",
        "slide the window closed",
        "push the window shut sideways",
        "slide the window pane to close it",
        "move the sliding window shut"),
}


def _check(task: str) -> tuple[str, ...]:
  if task not in _PARAPHRASES:
    raise ValueError(f"task={task!r} has no instructions; known tasks are Meta-World v3 names "
                     f"such as 'reach-v3' ({len(_PARAPHRASES)} in total)")
  return _PARAPHRASES[task]


def all_instructions(task: str) -> tuple[str, ...]:
  """Every paraphrase of a task's instruction (train ones first)."""
  return _check(task)


def train_instructions(task: str) -> tuple[str, ...]:
  """Paraphrases that may appear in training data."""
  return _check(task)[:NUM_TRAIN]


def held_out_instructions(task: str) -> tuple[str, ...]:
  """Paraphrases never used in training (the paraphrase-generalisation evaluation)."""
  return _check(task)[NUM_TRAIN:]


def sample_instruction(task: str, rng: np.random.Generator, held_out: bool = False) -> str:
  """One paraphrase, uniformly from the train or held-out set."""
  pool = held_out_instructions(task) if held_out else train_instructions(task)
  return pool[int(rng.integers(len(pool)))]


def tasks() -> tuple[str, ...]:
  return tuple(_PARAPHRASES)
