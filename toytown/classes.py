"""The classes toy-town draws, looked up by name in the Cityscapes label space (no ids by hand)."""
from __future__ import annotations

from amgen_core.labels import NAME_TO_ID

ROAD = NAME_TO_ID["road"]
SIDEWALK = NAME_TO_ID["sidewalk"]
BUILDING = NAME_TO_ID["building"]
WALL = NAME_TO_ID["wall"]
FENCE = NAME_TO_ID["fence"]
POLE = NAME_TO_ID["pole"]
TRAFFIC_LIGHT = NAME_TO_ID["traffic light"]
TRAFFIC_SIGN = NAME_TO_ID["traffic sign"]
VEGETATION = NAME_TO_ID["vegetation"]
TERRAIN = NAME_TO_ID["terrain"]
SKY = NAME_TO_ID["sky"]
PERSON = NAME_TO_ID["person"]
CAR = NAME_TO_ID["car"]
TRUCK = NAME_TO_ID["truck"]
BUS = NAME_TO_ID["bus"]

VEHICLES: tuple[int, ...] = (CAR, TRUCK, BUS)
THINGS: tuple[int, ...] = (PERSON, *VEHICLES)
STUFF: tuple[int, ...] = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
                          VEGETATION, TERRAIN, SKY)
TOYTOWN_IDS: tuple[int, ...] = tuple(sorted((*STUFF, *THINGS)))

# Instances follow Cityscapes: id * 1000 + k for things.
INSTANCE_BASE = 1000
