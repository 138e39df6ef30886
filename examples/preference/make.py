"""Writes the style-preference example data (ours, written for slmtune; no third-party text).

    python examples/preference/make.py        # -> train.jsonl (OpenAI's preference format), heldout.jsonl

Every pair answers a question twice with the same content; the preferred answer opens with
"In short:", the other does not. The trait is taught through pairs only (no supervised example
shows it), so a model that opens its answers with "In short:" after preference tuning learned it
from the preference. heldout.jsonl holds questions on other subjects in other phrasings, for
measuring the trait on unseen prompts (tests/service/test_preference_service.py), and
heldout_pairs.jsonl the same prompts as pairs (reward accuracy: `slmtune eval RUN --data
examples/preference/heldout_pairs.jsonl --pairs`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIT = "In short:"

# (subject, one-sentence answer) written by us.
FACTS = [
    ("a rainbow", "sunlight is split into colours by water droplets in the air"),
    ("a volcano", "it is an opening in the ground where molten rock reaches the surface"),
    ("photosynthesis", "plants turn light, water and carbon dioxide into sugar and oxygen"),
    ("a compass", "a magnetised needle turns to point along the Earth's magnetic field"),
    ("a battery", "it stores chemical energy and releases it as electricity"),
    ("rain", "water vapour cools, condenses into drops and falls when they grow heavy"),
    ("a bridge", "it carries a road or path across a gap such as a river"),
    ("a thermometer", "it measures temperature, often with a liquid that expands as it warms"),
    ("the moon's phases", "we see different parts of the moon's sunlit half as it orbits the Earth"),
    ("a spreadsheet", "it is a grid of cells that holds numbers and formulas"),
    ("a password manager", "it stores your passwords encrypted behind one main password"),
    ("a bicycle gear", "it changes how far the wheel turns for each turn of the pedals"),
    ("bread rising", "yeast makes gas bubbles that the dough traps as it ferments"),
    ("a lighthouse", "it is a tower with a bright light that guides ships at night"),
    ("a microwave oven", "it heats food by making the water in it vibrate"),
    ("tides", "the moon's gravity pulls the oceans into bulges that move around the Earth"),
    ("a seed", "it holds a young plant and food for it until it can grow"),
    ("a glacier", "it is a slow river of ice formed from packed snow"),
    ("an echo", "sound bounces off a hard surface and returns to you"),
    ("a recipe", "it lists ingredients and the steps to cook a dish"),
    ("a library card", "it lets you borrow books from a library"),
    ("a solar panel", "it turns sunlight directly into electricity"),
    ("a calendar", "it divides the year into months, weeks and days"),
    ("an umbrella", "it keeps rain off you with a cloth stretched over a frame"),
    ("a map scale", "it tells how a distance on the map compares with the real distance"),
    ("a fever", "the body raises its temperature to fight an infection"),
    ("a backup", "it is a second copy of your files kept somewhere else"),
    ("compost", "kitchen and garden waste breaks down into rich soil"),
    ("a kettle", "it boils water with a heating element at its base"),
    ("a train timetable", "it lists when each train leaves and arrives"),
    ("a museum", "it keeps and shows objects of art, history or science"),
    ("a hiccup", "the diaphragm twitches and the vocal cords snap shut"),
    ("an earthquake", "rock slips along a fault and the ground shakes"),
    ("a budget", "it plans how much money you will earn and spend"),
    ("a satellite", "it is an object that orbits a planet"),
    ("a firewall", "it filters network traffic by rules you set"),
    ("snow", "water vapour freezes into ice crystals high in the clouds"),
    ("a habit", "it is something you do so often that it becomes automatic"),
    ("a lens", "curved glass bends light to make things look bigger or sharper"),
    ("a vaccine", "it trains the immune system to recognise a germ"),
]
HELD_OUT = [
    ("a windmill", "wind turns its sails, which drive a machine"),
    ("thunder", "lightning heats the air so fast that it expands with a bang"),
    ("a dictionary", "it lists words with their meanings"),
    ("a greenhouse", "its glass traps the sun's warmth so plants grow"),
    ("an anchor", "its weight and hooks hold a ship in place"),
    ("a clock", "it counts time with a regular beat and shows it"),
    ("a cactus", "it stores water in its thick stem to survive dry places"),
    ("a password", "it is a secret word that proves who you are"),
    ("a telescope", "lenses or mirrors gather light to show far objects"),
    ("a tsunami", "an undersea earthquake pushes up a huge wave"),
    ("a bee", "it collects nectar and carries pollen between flowers"),
    ("a passport", "it proves your identity and citizenship when you travel"),
    ("frost", "water vapour freezes on cold surfaces at night"),
    ("a magnet", "it attracts iron because of its magnetic field"),
    ("a podcast", "it is an audio show you can listen to when you like"),
    ("a fossil", "it is the preserved trace of an ancient living thing"),
    ("a recipe card", "it holds one dish's ingredients and steps"),
    ("a hurricane", "a storm spins around a calm eye over warm sea"),
    ("a router", "it passes data between your devices and the internet"),
    ("a sundial", "the shadow of a pointer shows the time of day"),
]
QUESTIONS = ["What is {s}?", "Can you explain {s}?", "How does {s} work?", "Tell me about {s}.",
             "I've always wondered about {s}. What is it?"]
HELD_OUT_QUESTIONS = ["Could you describe {s} for me?", "What should I know about {s}?",
                      "Explain {s} in simple words.", "What exactly is {s}?"]


def answer(subject: str, fact: str) -> str:
    return f"{subject[0].upper() + subject[1:]}: {fact}."


def main() -> None:
    rng = random.Random(7)
    rows = []
    for subject, fact in FACTS:
        for template in rng.sample(QUESTIONS, 3):
            text = answer(subject, fact)
            rows.append({"input": {"messages": [{"role": "user", "content": template.format(s=subject)}]},
                         "preferred_output": [{"role": "assistant", "content": f"{TRAIT} {text}"}],
                         "non_preferred_output": [{"role": "assistant", "content": text}]})
    rng.shuffle(rows)
    heldout = [{"messages": [{"role": "user", "content": rng.choice(HELD_OUT_QUESTIONS).format(s=subject)}]}
               for subject, _ in HELD_OUT]
    # The held-out prompts as pairs too: reward accuracy on unseen subjects (`slmtune eval --pairs`).
    heldout_pairs = [{"input": prompt, "preferred_output": [{"role": "assistant", "content": f"{TRAIT} {answer(*fact)}"}],
                      "non_preferred_output": [{"role": "assistant", "content": answer(*fact)}]}
                     for prompt, fact in zip(heldout, HELD_OUT)]
    (HERE / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    (HERE / "heldout_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout_pairs))
    print(f"{len(rows)} pairs, {len(heldout)} held-out prompts (and as pairs)")


if __name__ == "__main__":
    main()
