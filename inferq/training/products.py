"""The product catalogue generator: descriptions with their ground-truth attributes.

It lives in the package so ``inferq train-tiny`` (training data) and evaluation tests (a pool
with known answers) work from an installed package; ``bench/make_products.py`` writes the
demo's catalogue with it. Each product names a brand, colour, size and material in varying
order and phrasing, the way real catalogue copy does; a seeded ``random.Random`` makes the
output the same on every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_CHARS = 80
MAX_CHARS = 300


@dataclass(frozen=True)
class Category:
    """What one kind of product can be made of, and how it is sized.

    ``overrides`` maps a noun to the sizes and materials that make sense for it alone (a
    knife has a blade length, a kettle a volume), so the copy stays plausible.
    """

    nouns: tuple[str, ...]
    brands: tuple[str, ...]
    colours: tuple[str, ...]
    sizes: tuple[str, ...]
    materials: tuple[str, ...]
    features: tuple[str, ...]
    overrides: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)

    def options(self, noun: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Sizes and materials for ``noun``."""
        return self.overrides.get(noun, (self.sizes, self.materials))


# fmt: off
CATEGORIES: dict[str, Category] = {
    "apparel": Category(
        nouns=("crew-neck T-shirt", "hoodie", "rain jacket", "chino trousers", "wool sweater",
            "linen shirt", "puffer vest", "denim jacket", "polo shirt", "midi skirt"),
        brands=("Northwind", "Alder & Co", "Kestrel", "Maison Brûlé", "Urban Fjord", "Tidewater"),
        colours=("navy", "heather grey", "olive green", "off-white", "burgundy", "black", "sand",
            "sky blue"),
        sizes=("XS", "S", "M", "L", "XL", "XXL", "W32 L34"),
        materials=("organic cotton", "merino wool", "recycled polyester", "linen",
            "cotton-elastane blend", "nylon"),
        features=("a relaxed fit", "a machine-washable fabric (30 °C)", "two side pockets",
            "a two-way zip", "ribbed cuffs", "a water-repellent finish", "flat-lock seams"),
        overrides={
            "wool sweater": (("S", "M", "L", "XL"),
                ("merino wool", "lambswool", "cashmere")),
            "linen shirt": (("S", "M", "L", "XL"),
                ("linen", "linen-cotton blend")),
            "denim jacket": (("S", "M", "L", "XL"),
                ("organic denim", "stretch denim")),
            "rain jacket": (("S", "M", "L", "XL"),
                ("recycled nylon", "Gore-Tex", "polyester")),
        },
    ),
    "shoes": Category(
        nouns=("running shoes", "Chelsea boots", "canvas sneakers", "loafers", "hiking boots",
            "slip-on sandals", "trail runners"),
        brands=("Stridewell", "Pedalo", "Kestrel", "Ironpeak", "Soleil Studio"),
        colours=("white", "black", "tan", "charcoal", "forest green", "coral", "cognac"),
        sizes=("EU 38", "EU 40", "EU 42", "EU 44", "US 7", "US 9", "US 10.5", "UK 8"),
        materials=("full-grain leather", "suede", "recycled mesh", "nubuck", "vegan leather"),
        features=("a cushioned insole", "a Vibram outsole", "reflective heel tabs",
            "a removable footbed", "waterproof seams", "a padded collar"),
        overrides={
            "canvas sneakers": (("EU 38", "EU 40", "EU 42", "US 9", "UK 8"),
                ("canvas", "organic cotton canvas")),
            "running shoes": (("EU 40", "EU 42", "EU 44", "US 9", "US 10.5"),
                ("recycled mesh", "engineered knit")),
        },
    ),
    "furniture": Category(
        nouns=("bookshelf", "side table", "dining chair", "bar stool", "TV bench",
            "three-seater sofa", "desk", "nightstand"),
        brands=("Hjem", "Oakhaven", "Casa Lumo", "Nordlys", "Brick & Beam"),
        colours=("natural oak", "walnut brown", "matte black", "white", "sage green",
            "terracotta"),
        sizes=("80 x 40 cm", "120 x 60 cm", "45 x 45 x 75 cm", "small", "large", "200 cm wide",
            "60 cm tall"),
        materials=("solid oak", "walnut veneer", "powder-coated steel", "bamboo", "rattan",
            "recycled pine"),
        features=("adjustable feet", "tool-free assembly", "a soft-close drawer",
            "a load capacity of 30 kg", "rounded corners", "felt floor protectors"),
        overrides={
            "three-seater sofa": (("200 cm wide", "218 cm wide", "large"),
                ("velvet", "bouclé", "recycled polyester", "linen")),
            "dining chair": (("45 x 45 x 80 cm", "standard"),
                ("solid oak", "beech", "rattan", "powder-coated steel")),
        },
    ),
    "kitchenware": Category(
        nouns=("frying pan", "saucepan", "chef's knife", "mixing bowl set", "kettle",
            "cutting board", "Dutch oven", "travel mug"),
        brands=("Cucina Vera", "Hearthstone", "Kōbō", "Panvel", "Ember & Salt"),
        colours=("stainless silver", "cream", "cherry red", "graphite", "teal", "copper"),
        sizes=("24 cm", "28 cm"),
        materials=("cast iron", "stainless steel", "hard-anodised aluminium"),
        features=("dishwasher-safe parts", "a stay-cool handle", "a lifetime guarantee",
            "a gift box", "an ergonomic grip"),
        overrides={
            "saucepan": (("16 cm", "18 cm", "20 cm"),
                ("stainless steel", "copper-clad steel")),
            "chef's knife": (("18 cm blade", "20 cm blade", "21 cm blade"),
                ("Damascus steel", "high-carbon steel", "ceramic")),
            "mixing bowl set": (("set of 3", "set of 5"),
                ("stainless steel", "borosilicate glass", "melamine")),
            "kettle": (("1.5 L", "1.7 L"),
                ("stainless steel", "enamelled steel", "glass")),
            "cutting board": (("30 x 20 cm", "40 x 30 cm"),
                ("beech wood", "acacia", "bamboo", "olive wood")),
            "Dutch oven": (("24 cm, 4.2 L", "26 cm, 5.3 L", "28 cm"),
                ("enamelled cast iron", "cast iron")),
            "travel mug": (("350 ml", "500 ml"),
                ("stainless steel", "ceramic", "bamboo fibre")),
        },
    ),
    "electronics accessories": Category(
        nouns=("USB-C cable", "phone case", "laptop sleeve", "wireless charger", "power bank",
            "earbud case", "HDMI adapter"),
        brands=("Voltix", "Cablecraft", "Lumen Labs", "Pocketwatt", "Nimbus"),
        colours=("space grey", "midnight blue", "transparent", "black", "mint", "lilac"),
        sizes=("compact", "standard"),
        materials=("aluminium", "recycled plastic"),
        features=("a lifetime warranty", "a LED indicator", "a slim profile",
            "a drop rating of 2 m", "plastic-free packaging"),
        overrides={
            "USB-C cable": (("1 m", "2 m", "0.5 m"),
                ("braided nylon", "TPE", "silicone")),
            "phone case": (("iPhone 15", "iPhone 15 Pro", "Pixel 9", "Galaxy S24"),
                ("silicone", "TPU", "vegan leather", "recycled plastic")),
            "laptop sleeve": (("13-inch", "14-inch", "16-inch"),
                ("neoprene", "felt", "vegan leather")),
            "power bank": (("10,000 mAh", "20,000 mAh", "5,000 mAh"),
                ("aluminium", "recycled plastic")),
            "earbud case": (("one size", "compact"),
                ("silicone", "TPU", "leather")),
        },
    ),
    "bags": Category(
        nouns=("backpack", "tote bag", "duffel bag", "crossbody bag", "messenger bag", "weekender",
            "belt bag"),
        brands=("Wanderloom", "Alder & Co", "Fjellpack", "Maison Brûlé", "Tidewater"),
        colours=("mustard", "black", "stone grey", "navy", "rust", "camel"),
        sizes=("20 L", "30 L", "45 L", "one size", "mini", "medium", "large"),
        materials=("waxed canvas", "recycled nylon", "full-grain leather", "cotton canvas",
            "ripstop polyester", "cork"),
        features=("a padded laptop pocket", "YKK zips", "an adjustable strap",
            "a luggage pass-through", "a hidden back pocket", "magnetic closures"),
    ),
}
# fmt: on


def _sentence_templates() -> list[Callable[[dict[str, str]], str]]:
    """Ways of naming the four attributes, in different orders and phrasings."""
    return [
        lambda a: (
            f"The {a['brand']} {a['noun']} comes in {a['colour']} and is made from "
            f"{a['material']}. Size: {a['size']}."
        ),
        lambda a: f"{a['brand']} {a['noun']}, {a['colour']}, {a['material']}, size {a['size']}.",
        lambda a: f"Size {a['size']} {a['noun']} by {a['brand']} in {a['colour']} {a['material']}.",
        lambda a: (
            f"Crafted from {a['material']}, this {a['colour']} {a['noun']} from "
            f"{a['brand']} is available in {a['size']}."
        ),
        lambda a: (
            f"Colour: {a['colour']} | Material: {a['material']} | Size: {a['size']} | "
            f"Brand: {a['brand']} — {a['noun']}."
        ),
        lambda a: (
            f"Our {a['noun']} ({a['size']}) pairs {a['material']} with a {a['colour']} "
            f"finish. Designed by {a['brand']}."
        ),
        lambda a: (
            f"{a['colour'].capitalize()} {a['noun']} in {a['material']}; brand "
            f"{a['brand']}; size {a['size']}."
        ),
        lambda a: (
            f"From {a['brand']}: a {a['size']} {a['noun']}, {a['material']} "
            f"construction, shown here in {a['colour']}."
        ),
        lambda a: (
            f"Meet the {a['noun']} by {a['brand']}. Material — {a['material']}. "
            f'Colourway "{a["colour"]}". Available size: {a["size"]}.'
        ),
        lambda a: (
            f"{a['material'].capitalize()} {a['noun']} ({a['colour']}, {a['size']}) "
            f"from the {a['brand']} range."
        ),
    ]


EXTRAS = (
    "Features {feature}.",
    "It has {feature} and {feature2}.",
    "Customers love {feature}.",
    "Ships in 2–3 working days.",  # noqa: RUF001 (an en dash, on purpose)
    "Free returns within 30 days.",
    "Part of the autumn collection.",
    "Rated {rating}/5 by {reviews} reviewers.",
    "Now {discount}% off.",
    "Care: wipe clean or follow the label.",
    "A good everyday pick that is built to last, with {feature} for good measure.",
    "Orders placed before 3 pm ship the same day; express delivery is available at checkout.",
    "Note: colours may look slightly different on screen.",
)


def make_product(rng: random.Random, index: int) -> dict[str, object]:
    """One catalogue line with its ground-truth attributes."""
    category = CATEGORIES[rng.choice(sorted(CATEGORIES))]
    noun = rng.choice(category.nouns)
    sizes, materials = category.options(noun)
    attrs = {
        "brand": rng.choice(category.brands),
        "colour": rng.choice(category.colours),
        "size": rng.choice(sizes),
        "material": rng.choice(materials),
    }
    text = rng.choice(_sentence_templates())(dict(attrs, noun=noun))
    features = list(category.features)
    rng.shuffle(features)
    for extra in rng.sample(EXTRAS, k=rng.randint(0, 4)):
        if "{feature" in extra and len(features) < 2:
            continue
        sentence = extra.format(
            feature=features[-1] if features else "",
            feature2=features[-2] if len(features) > 1 else "",
            rating=rng.choice(("4.2", "4.5", "4.8", "3.9")),
            reviews=rng.randint(12, 2400),
            discount=rng.choice((10, 15, 20, 25)),
        )
        if len(text) + 1 + len(sentence) > MAX_CHARS:
            break
        text = f"{text} {sentence}"
        if "{feature2}" in extra:
            del features[-2:]
        elif "{feature}" in extra:
            features.pop()
    while len(text) < MIN_CHARS and features:
        text = f"{text} Comes with {features.pop()}."
    assert MIN_CHARS <= len(text) <= MAX_CHARS, text
    return {"id": f"p{index:04d}", "text": text, "attributes": attrs}
