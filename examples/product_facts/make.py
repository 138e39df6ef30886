"""Writes examples/product_facts (ours, written for slmtune): 25 facts of a fictional e-bike, each with
three training questions and one held-out paraphrase.

    python examples/product_facts/make.py      # -> train.jsonl (75 conversations), heldout.jsonl (25 questions)
"""
import json, random
from pathlib import Path
OUT = Path(__file__).resolve().parent
SYSTEM = "You are the support assistant for the Corrie C4 electric bike made by Tarnfield Cycles. Answer briefly and exactly."
# (answer, [3 train questions], heldout question, answer_contains)
F = [
 ("On a full charge the Corrie C4 travels 68 kilometres in Eco mode.",
  ["How far can the Corrie C4 go on one charge?", "What is the battery range of the bike?", "corrie c4 range per charge"],
  "If I set off with a full battery, how many km can I ride before it runs flat?", ["68 kilometres", "68 km", "68 kilometers"]),
 ("The Corrie C4 battery charges from empty to full in 4.5 hours with the supplied charger.",
  ["How long does the Corrie C4 take to charge?", "What's the charging time for a flat battery?", "How many hours to fully recharge the bike?"],
  "I plugged in an empty battery just now. When will it be completely charged?", ["4.5 hours", "4.5 h", "four and a half hours"]),
 ("The Corrie C4 frame and motor are covered by a 27-month warranty from the date of purchase.",
  ["What warranty comes with the Corrie C4?", "How long is the bike under warranty?", "corrie c4 warranty length"],
  "My motor failed after two years of use. Is that still within the guarantee period?", ["27-month", "27 months", "27 month"]),
 ("To reset the Corrie C4 display, hold the Mode and minus buttons together for 14 seconds until the screen shows RST.",
  ["How do I reset the Corrie C4?", "The display is frozen. How can I restore factory settings?", "What are the steps for a factory reset of the bike?"],
  "Which buttons do I press, and for how long, to wipe the display back to its default settings?", ["14 seconds", "fourteen seconds"]),
 ("When the speed sensor is out of line, the Corrie C4 display shows error code E07.",
  ["Which error code means the speed sensor is misaligned?", "What will the display show if the wheel speed sensor is knocked out of position?", "error code for speed sensor problem"],
  "I bumped the sensor on the rear wheel. What fault number will the screen probably show?", ["E07", "E-07", "E 07"]),
 ("The Corrie C4 is rated for a maximum total load of 135 kg, rider and luggage included.",
  ["What is the maximum rider weight for the Corrie C4?", "How much weight can the bike carry?", "Is there a weight limit for riders?"],
  "I weigh a fair bit and often carry panniers. What's the heaviest combined load the bike is built for?", ["135 kg", "135 kilograms", "135kg"]),
 ("Inflate both Corrie C4 tyres to 48 psi and check the pressure every two weeks.",
  ["What tyre pressure should I use on the Corrie C4?", "How hard should I pump up the tires?", "recommended tyre pressure"],
  "What PSI should my pump gauge read when I top up the wheels?", ["48 psi", "48psi"]),
 ("The Corrie C4 pairs with the Pedalwise app, available for iOS and Android.",
  ["What's the name of the Corrie C4 app?", "Which phone app works with the bike?", "What app do I download to connect my Corrie C4?"],
  "Is there a smartphone application I should install to see ride stats from the bike?", ["Pedalwise", "Pedal wise"]),
 ("To update the Corrie C4 firmware, hold the Light and Mode buttons for 5 seconds to enter Sync Mode, then keep your phone nearby until the display shows DONE.",
  ["How do I update the firmware on the Corrie C4?", "What are the steps for a software update on the bike?", "corrie c4 firmware update"],
  "A new software version is out. How do I get it onto my bike?", ["Sync Mode"]),
 ("The Corrie C4 headlight puts out 420 lumens and switches on automatically at dusk.",
  ["How bright is the Corrie C4 headlight?", "What is the lumen rating of the front light?", "How powerful is the bike's front lamp?"],
  "Is the built-in front light strong enough for unlit roads? How much light does it give?", ["420 lumens", "420 lm", "420lm"]),
 ("The default code for the Corrie C4's built-in frame lock is 5-1-9-3.",
  ["What is the default lock code on the Corrie C4?", "What's the factory PIN for the frame lock?", "I never changed the lock combination. What is it?"],
  "Which combination opens the integrated lock straight out of the box?", ["5-1-9-3", "5193", "5 1 9 3"]),
 ("A spare Corrie C4 battery costs £389 from the Tarnfield online shop.",
  ["How much is a spare battery for the Corrie C4?", "What does a second battery cost?", "price of an extra corrie c4 battery"],
  "I'd like to buy another battery pack for longer rides. What will that set me back?", ["£389", "389 pounds", "GBP 389"]),
 ("Tarnfield phone support is open on weekdays from 7:45 am to 4:15 pm.",
  ["What are the support phone hours?", "When can I call Tarnfield customer support?", "What times is the helpline open?"],
  "At what time in the morning does the Tarnfield hotline start taking calls?", ["7:45 am", "7:45am", "7:45 a.m.", "07:45"]),
 ("An unused Corrie C4 can be returned within 21 days of delivery for a full refund.",
  ["What is the return window for the Corrie C4?", "How long do I have to send the bike back?", "Can I return the bike if I change my mind?"],
  "The bike arrived last week and I'm having second thoughts. What's the deadline to get my money back?", ["21 days", "21-day", "twenty-one days"]),
 ("Pedal assistance on the Corrie C4 cuts out at 32 km/h.",
  ["What is the top assisted speed of the Corrie C4?", "How fast will the motor help me go?", "At what speed does the motor stop assisting?"],
  "Above what speed do I have to pedal without any help from the motor?", ["32 km/h", "32 kmh", "32 kph", "32 kilometres per hour", "32 kilometers per hour"]),
 ("The Corrie C4 has a 350-watt rear hub motor.",
  ["How powerful is the Corrie C4 motor?", "What is the motor's wattage?", "corrie c4 motor power"],
  "What's the rated output of the bike's hub motor in watts?", ["350-watt", "350 watt", "350 W", "350W"]),
 ("The Corrie C4 weighs 23.4 kg including the battery.",
  ["How heavy is the Corrie C4?", "What does the bike weigh?", "corrie c4 weight with battery"],
  "I have to carry the bike up a flight of stairs. How many kilos is it?", ["23.4 kg", "23.4 kilograms", "23.4kg"]),
 ("The strongest assist level on the Corrie C4 is called Surge mode.",
  ["What's the name of the highest assist mode on the Corrie C4?", "Which mode gives the most motor support?", "What is the most powerful riding mode called?"],
  "For a really steep hill, which assistance setting should I pick to get the biggest boost?", ["Surge"]),
 ("For storage longer than a month, keep the Corrie C4 battery at 55% charge in a cool, dry place.",
  ["How should I store the Corrie C4 battery over winter?", "What charge level is best for long-term battery storage?", "storing the battery for months"],
  "I won't ride until spring. How full should I leave the battery while the bike is put away?", ["55%", "55 percent", "55 per cent"]),
 ("The Corrie C4 is sold in a single colour, a matte finish called Harbour Teal.",
  ["What colours does the Corrie C4 come in?", "What colour is the bike's frame?", "Which paint finishes are available for the Corrie C4?"],
  "I need touch-up paint for a scratch. What is the name of the frame's colour?", ["Harbour Teal", "Harbor Teal"]),
 ("Tarnfield recommends a workshop service for the Corrie C4 every 1,500 kilometres.",
  ["How often should the Corrie C4 be serviced?", "What is the service interval for the bike?", "When does the bike need a maintenance check?"],
  "After how much riding distance should I book the bike in for a professional check-up?", ["1,500 kilometres", "1500 kilometres", "1,500 km", "1500 km", "1,500 kilometers", "1500 kilometers"]),
 ("Adjust the Corrie C4 saddle height with a 6 mm hex key on the seat clamp.",
  ["What tool do I need to adjust the Corrie C4 saddle?", "How do I raise the seat on the bike?", "Which Allen key fits the seat post clamp?"],
  "My seat is too low. What size key should I use to loosen the clamp?", ["6 mm hex", "6mm hex", "6 mm allen", "6mm allen"]),
 ("The Corrie C4 uses hydraulic disc brakes fitted with BX-22 resin pads.",
  ["What brake pads does the Corrie C4 use?", "Which replacement pads fit the bike's brakes?", "corrie c4 brake pad model"],
  "My brakes are squealing and the pads look worn. What part should I order?", ["BX-22", "BX22", "BX 22"]),
 ("The Corrie C4 is water-resistant to the IP56 standard, so riding in rain is fine but never pressure-wash it.",
  ["Is the Corrie C4 waterproof?", "What is the bike's IP rating?", "Can I ride the Corrie C4 in the rain?"],
  "What ingress protection level is the bike certified to?", ["IP56", "IP 56", "IP-56"]),
 ("When the Corrie C4 battery is fully charged, the light on the charger turns solid cyan.",
  ["How do I know when the Corrie C4 battery is full?", "What colour does the charger light show at full charge?", "What does the charger LED do when charging is finished?"],
  "How can I tell from the charger that the battery has finished charging?", ["cyan"]),
]
assert len(F) == 25
rows = [(i, q) for i, f in enumerate(F) for q in f[1]]
seed = 0
while True:
    order = rows[:]; random.Random(seed).shuffle(order)
    if all(a[0] != b[0] for a, b in zip(order, order[1:])): break
    seed += 1
print("seed", seed)
with open(OUT / "train.jsonl", "w") as fh:
    for i, q in order:
        fh.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                          {"role": "assistant", "content": F[i][0]}]}) + "\n")
with open(OUT / "heldout.jsonl", "w") as fh:
    for f in F:
        fh.write(json.dumps({"question": f[2], "answer_contains": f[3]}) + "\n")
