"""Procedural face-like identities, so the whole pipeline trains and evaluates without a face dataset.

An identity is a set of geometric and colour parameters (face outline, skin tone, eyes, brows, nose,
mouth, hair, marks, a faint skin texture, beard, glasses) drawn from a seeded generator. A sample
renders that identity under nuisance: small pose change, lighting, colour cast, blur, noise,
expression, background and clothing, sometimes a small occluder. A chosen share of samples are
*hard*: large pose, plus at least two of heavy occlusion, strong blur and low light. Those are the
samples the difficulty score of the method should find.

Everything is deterministic for a seed: identity ``i`` and sample ``j`` have their own generator
seeded from ``(seed, role, i, j)``, so any subset renders the same pixels in any order.

Rendering works in *face space*: each pixel's coordinates are mapped once through the inverse of
the sample's pose, and every shape is a soft-edged (anti-aliased) ellipse evaluated on the small
pixel window it can touch: about 3 ms per 112x112 image on one core (JPEG included).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter

from cdface.core.atomic import atomic_write_text
from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.training.data.binfile import write_bin
from cdface.training.data.recordio import write_face_recordio

# Generator roles keep training and verification identities disjoint for the same seed.
TRAIN_ROLE = 0
VAL_ROLE = 1
_IDENTITY_STREAM = 1
_SAMPLE_STREAM = 2
_HARD_STREAM = 3
_PAIR_STREAM = 4

_SKIN_LIGHT = np.array([236, 200, 172], np.float32)
_SKIN_DARK = np.array([88, 56, 38], np.float32)
_HAIR_COLOURS = np.array(
    [[22, 18, 16], [55, 36, 24], [105, 70, 42], [190, 155, 95], [140, 60, 28], [135, 132, 128], [215, 212, 205]],
    np.float32,
)
_HAIR_WEIGHTS = np.array([0.3, 0.25, 0.17, 0.1, 0.06, 0.08, 0.04])
_IRIS_COLOURS = np.array(
    [[45, 28, 18], [95, 58, 30], [120, 98, 48], [68, 108, 70], [70, 110, 165], [118, 128, 140]], np.float32
)
_SCLERA = np.array([236, 232, 226], np.float32)


@dataclass(frozen=True)
class FaceIdentity:
    """What stays the same across one identity's images (face-space units: the crop spans [-1, 1])."""

    face_width: float
    face_height: float
    face_centre_y: float
    jaw_taper: float
    face_squareness: float  # superellipse exponent: 2 = oval, larger = squarer
    skin: np.ndarray
    cheek_blush: float
    texture_frequency: np.ndarray  # (kx, ky) of a faint skin pattern
    texture_phase: float
    texture_strength: float
    ear_y: float
    ear_size: float
    hair: np.ndarray
    hair_volume: float
    hairline_y: float
    hairline_curve: float
    hairline_slope: float
    long_hair: float  # 0: none; else how far below the chin the hair falls
    eye_spacing: float
    eye_y: float
    eye_width: float
    eye_height: float
    eye_tilt: float
    iris: np.ndarray
    iris_radius: float
    lid_thickness: float
    brow_gap: float
    brow_length: float
    brow_thickness: float
    brow_angle: float
    brow_arch: float
    brow_colour: np.ndarray
    nose_y: float
    nose_length: float
    nose_width: float
    mouth_y: float
    mouth_width: float
    upper_lip: float
    lower_lip: float
    smile: float
    lip_colour: np.ndarray
    moles: np.ndarray  # [k, 3]: x, y, radius
    beard: float  # alpha of beard/stubble, 0 for none
    moustache: bool
    glasses: np.ndarray | None  # frame colour, or None


def random_identity(rng: np.random.Generator) -> FaceIdentity:
    u = rng.uniform
    tone = u(0, 1) ** 0.8
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * tone + rng.normal(0, 8, 3)
    hair = _HAIR_COLOURS[rng.choice(len(_HAIR_COLOURS), p=_HAIR_WEIGHTS)] * u(0.8, 1.2) + rng.normal(0, 6, 3)
    hair = np.clip(hair, 5, 250).astype(np.float32)
    face_width, face_height = u(0.56, 0.72), u(0.8, 0.95)
    face_centre_y = u(0.08, 0.16)
    n_moles = rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])
    moles = np.stack([u(-0.45, 0.45, n_moles), u(-0.2, 0.75, n_moles), u(0.012, 0.025, n_moles)], axis=1)
    lip = skin * u(0.55, 0.8) + np.array([150, 45, 55]) * u(0.15, 0.45)
    male_like = u() < 0.5
    return FaceIdentity(
        face_width=face_width,
        face_height=face_height,
        face_centre_y=face_centre_y,
        jaw_taper=u(0.0, 0.4),
        face_squareness=u(2.0, 3.2),
        skin=np.clip(skin, 30, 250).astype(np.float32),
        cheek_blush=u(0.0, 0.25),
        texture_frequency=rng.normal(0, 14, 2).astype(np.float32),
        texture_phase=u(0, 2 * math.pi),
        texture_strength=u(0.0, 0.06),
        ear_y=u(-0.12, 0.05),
        ear_size=u(0.85, 1.2),
        hair=hair,
        hair_volume=u(0.02, 0.2),
        hairline_y=face_centre_y - face_height * u(0.45, 0.8) if u() > 0.07 else -2.0,  # some are bald
        hairline_curve=u(-0.1, 0.8),
        hairline_slope=u(-0.3, 0.3),
        long_hair=u(0.4, 1.1) if u() < 0.35 else 0.0,
        eye_spacing=u(0.27, 0.36),
        eye_y=u(-0.16, -0.04),
        eye_width=u(0.085, 0.12),
        eye_height=u(0.035, 0.06),
        eye_tilt=u(-0.15, 0.15),
        iris=_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * u(0.85, 1.15),
        iris_radius=u(0.038, 0.058),
        lid_thickness=u(0.008, 0.025),
        brow_gap=u(0.08, 0.15),
        brow_length=u(0.09, 0.15),
        brow_thickness=u(0.014, 0.04),
        brow_angle=u(-0.35, 0.25),
        brow_arch=u(-0.2, 0.6),
        brow_colour=(hair * u(0.45, 0.9)).astype(np.float32),
        nose_y=u(0.2, 0.32),
        nose_length=u(0.18, 0.3),
        nose_width=u(0.08, 0.14),
        mouth_y=u(0.48, 0.6),
        mouth_width=u(0.14, 0.24),
        upper_lip=u(0.014, 0.034),
        lower_lip=u(0.018, 0.045),
        smile=u(-0.3, 0.45),
        lip_colour=np.clip(lip, 20, 250).astype(np.float32),
        moles=moles.astype(np.float32),
        beard=u(0.35, 0.95) if male_like and u() < 0.4 else 0.0,
        moustache=bool(male_like and u() < 0.3),
        glasses=(np.array([30, 30, 30]) + u(0, 160) * rng.dirichlet([1, 1, 1]) * 3).astype(np.float32)
        if u() < 0.15
        else None,
    )


@dataclass(frozen=True)
class Nuisance:
    """What changes between two images of one identity."""

    rotation: float
    scale: float
    shift: tuple[float, float]
    yaw: float
    background: tuple[np.ndarray, np.ndarray, float]  # two colours and a gradient angle
    clothing: np.ndarray
    light_gain: float
    gamma: float
    colour_cast: np.ndarray
    light_direction: tuple[float, float, float]  # (dx, dy, strength)
    blur: float
    noise: float
    smile: float
    mouth_open: float
    eye_open: float
    gaze: tuple[float, float]
    brow_raise: float
    occluders: list[tuple[float, float, float, float, float, np.ndarray]]  # cx, cy, w, h, angle, colour (face space)
    noise_seed: int


def random_nuisance(rng: np.random.Generator, hard: bool, difficulty: float = 1.0) -> Nuisance:
    """Normal nuisance scales with ``difficulty``; hard samples get large pose and >= 2 strong degradations."""
    u, d = rng.uniform, difficulty
    occluders: list = []
    if hard:
        rotation = rng.choice([-1, 1]) * u(0.25, 0.5)
        scale = 1 + u(-0.22, 0.15)
        shift = (u(-0.12, 0.12), u(-0.12, 0.12))
        yaw = rng.choice([-1, 1]) * u(0.3, 0.6)
        strong = set(rng.choice(["occlusion", "blur", "dark"], size=rng.integers(2, 4), replace=False).tolist())
    else:
        rotation = float(np.clip(rng.normal(0, 0.07 * d), -0.18 * d, 0.18 * d))
        scale = 1 + float(np.clip(rng.normal(0, 0.03 * d), -0.08, 0.08))
        shift = (float(rng.normal(0, 0.025 * d)), float(rng.normal(0, 0.025 * d)))
        yaw = float(np.clip(rng.normal(0, 0.1 * d), -0.25, 0.25))
        strong = set()

    if "occlusion" in strong:
        kind = rng.integers(3)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if kind == 0:  # sunglasses / band over the eyes
            occluders.append((u(-0.1, 0.1), u(-0.15, -0.05), u(0.8, 1.1), u(0.18, 0.3), u(-0.15, 0.15), colour))
        elif kind == 1:  # mask or scarf over nose and mouth
            occluders.append((u(-0.1, 0.1), u(0.45, 0.65), u(0.75, 1.0), u(0.5, 0.7), u(-0.15, 0.15), colour))
        else:  # a hand or object over one side
            side = rng.choice([-1, 1])
            occluders.append((side * u(0.3, 0.5), u(0.0, 0.4), u(0.45, 0.65), u(0.6, 1.0), u(-0.4, 0.4), colour))
    elif u() < 0.08 * d:
        occluders.append(
            (u(-0.7, 0.7), u(0.3, 0.9), u(0.12, 0.3), u(0.12, 0.3), u(-0.5, 0.5),
             rng.uniform(0, 255, 3).astype(np.float32))
        )

    if "dark" in strong:
        light_gain, gamma, noise = u(0.3, 0.55), u(1.3, 1.8), u(6, 12)
        colour_cast = rng.normal(0, 0.12, 3)
    else:
        light_gain, gamma, noise = u(1 - 0.15 * d, 1 + 0.15 * d), math.exp(rng.normal(0, 0.12 * d)), u(0, 3 * d)
        colour_cast = rng.normal(0, 0.04 * d, 3)
    angle = u(0, 2 * math.pi)
    blur = u(1.4, 2.6) if "blur" in strong else u(0, 0.7 * d)
    return Nuisance(
        rotation=float(rotation),
        scale=float(scale),
        shift=(float(shift[0]), float(shift[1])),
        yaw=float(yaw),
        background=(rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32),
                    u(0, 2 * math.pi)),
        clothing=rng.uniform(0, 255, 3).astype(np.float32),
        light_gain=float(light_gain),
        gamma=float(gamma),
        colour_cast=(1 + colour_cast).astype(np.float32),
        light_direction=(math.cos(angle), math.sin(angle), u(0, 0.3 * d) if not hard else u(0.2, 0.5)),
        blur=float(blur),
        noise=float(noise),
        smile=float(rng.normal(0, 0.1 * d)),
        mouth_open=u(0, 0.03 * d) if u() < 0.3 else 0.0,
        eye_open=u(0.1, 0.3) if u() < 0.04 * d else u(0.75, 1.05),
        gaze=(float(rng.normal(0, 0.25)), float(rng.normal(0, 0.15))),
        brow_raise=float(rng.normal(0, 0.01 * d)),
        occluders=occluders,
        noise_seed=int(rng.integers(1 << 62)),
    )


class _Canvas:
    """An RGB float canvas with every pixel's face-space coordinates under one pose."""

    def __init__(self, size: int, rotation: float, scale: float, shift: tuple[float, float]):
        self.size = size
        self.rgb = np.empty((size, size, 3), np.float32)
        centres = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1)
        ux = centres[None, :] - shift[0]
        vy = centres[:, None] - shift[1]
        self.cos, self.sin, self.scale, self.shift = math.cos(rotation), math.sin(rotation), scale, shift
        # Face space = inverse pose of image space (image = scale * R(rotation) * face + shift).
        self.X = ((self.cos * ux + self.sin * vy) / scale).astype(np.float32)
        self.Y = ((-self.sin * ux + self.cos * vy) / scale).astype(np.float32)
        self.pixel = 2.0 / (size * scale)  # one pixel in face-space units

    def window(self, cx: float, cy: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel rows/columns that a face-space disc can touch, or None when it is off-canvas."""
        px = self.scale * (self.cos * cx - self.sin * cy) + self.shift[0]
        py = self.scale * (self.sin * cx + self.cos * cy) + self.shift[1]
        half = self.size / 2
        r = radius * self.scale * half + 2
        col, row = (px + 1) * half - 0.5, (py + 1) * half - 0.5
        c0, c1 = max(int(col - r), 0), min(int(col + r) + 2, self.size)
        r0, r1 = max(int(row - r), 0), min(int(row + r) + 2, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(self, cx, cy, rx, ry, angle=0.0, window=None, bend=0.0):
        """(window, soft alpha) of an ellipse; ``bend`` curves it like a smile (y shifted by bend * x^2)."""
        window = window or self.window(cx, cy, max(rx, ry) + abs(bend) * rx * rx)
        if window is None:
            return None, None
        dx, dy = self.X[window] - cx, self.Y[window] - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if bend:
            dy = dy - bend * dx * dx
        # Signed distance to the outline, roughly, in pixels: a one-pixel anti-aliased edge.
        edge = min(rx, ry) / self.pixel
        alpha = np.hypot(dx * (1 / rx), dy * (1 / ry))
        alpha *= -edge
        alpha += edge + 0.5
        return window, np.clip(alpha, 0, 1, out=alpha)

    def paint(self, window, alpha, colour, opacity: float = 1.0) -> None:
        if window is None:
            return
        target = self.rgb[window]
        change = np.asarray(colour, np.float32) - target
        change *= (alpha * opacity if opacity != 1.0 else alpha)[..., None]
        target += change

    def paint_ellipse(self, colour, cx, cy, rx, ry, angle=0.0, opacity=1.0, bend=0.0) -> None:
        window, alpha = self.ellipse(cx, cy, rx, ry, angle, bend=bend)
        self.paint(window, alpha, colour, opacity)


def render_face(identity: FaceIdentity, nuisance: Nuisance, size: int = INPUT_SIZE) -> np.ndarray:
    """One uint8 [size, size, 3] RGB image of ``identity`` under ``nuisance``."""
    f, n = identity, nuisance
    canvas = _Canvas(size, n.rotation, n.scale, n.shift)
    X, Y = canvas.X, canvas.Y

    # Background: a two-colour gradient in image space (it does not move with the head).
    c0, c1, angle = n.background
    ramp = (np.cos(angle) * X + np.sin(angle) * Y) * 0.35 + 0.5
    canvas.rgb[:] = c0 + np.clip(ramp, 0, 1)[..., None] * (c1 - c0)

    # Yaw: features slide sideways and the face narrows; the outline moves less than the features.
    squash = 1 - 0.3 * abs(n.yaw)
    feature_dx = 0.22 * n.yaw
    outline_dx = 0.08 * n.yaw
    fw, fh, fy = f.face_width * squash, f.face_height, f.face_centre_y
    skin = f.skin

    if f.long_hair:
        canvas.paint_ellipse(f.hair, outline_dx, fy + 0.1 * f.long_hair, fw + 0.12, fh * (0.75 + 0.45 * f.long_hair))
    canvas.paint_ellipse(n.clothing, outline_dx * 0.5, 1.35, 1.15, 0.45)
    canvas.paint_ellipse(skin * 0.82, outline_dx, fy + fh * 0.85, fw * 0.5, 0.5)  # neck
    for side in (-1, 1):
        # The ear on the side the head turns towards hides behind the face.
        ear_x = outline_dx + side * fw * (0.98 - 0.25 * max(0.0, side * n.yaw))
        canvas.paint_ellipse(skin * 0.9, ear_x, fy + f.ear_y, 0.07 * f.ear_size, 0.16 * f.ear_size)

    # Face: a superellipse narrowing towards the chin, shaded darker towards its edge.
    window = canvas.window(outline_dx, fy, max(fw, fh))
    fx_, fy_ = X[window] - outline_dx, Y[window] - fy
    taper = 1 - f.jaw_taper * np.clip(fy_ / fh, 0, 1) ** 1.5
    p = f.face_squareness
    r = (np.abs(fx_ / (fw * taper)) ** p + np.abs(fy_ / fh) ** p) ** (1 / p)
    face_alpha = np.clip((1 - r) * (fw / canvas.pixel) + 0.5, 0, 1)
    texture = 1 + f.texture_strength * np.sin(f.texture_frequency[0] * fx_ + f.texture_frequency[1] * fy_
                                              + f.texture_phase)
    shading = (1 - 0.22 * np.clip(r, 0, 1) ** 4) * texture
    canvas.paint(window, face_alpha, skin * shading[..., None])

    for side in (-1, 1):  # cheeks
        canvas.paint_ellipse((200, 80, 80), feature_dx + side * 0.36 * squash, 0.32, 0.13, 0.09, opacity=f.cheek_blush)
    for mx, my, mr in f.moles:
        canvas.paint_ellipse(skin * 0.35, feature_dx + mx * squash, my, mr, mr)

    if f.beard:  # beard/stubble: the face below the upper lip
        below_lip = np.clip((Y[window] - (f.mouth_y - 0.1)) / 0.05, 0, 1)
        canvas.paint(window, face_alpha * below_lip, f.hair, f.beard)

    # Hair on top: inside an enlarged head outline and above an identity-specific hairline.
    if f.hairline_y > -1.5:
        hair_window, hair_alpha = canvas.ellipse(
            outline_dx, fy - f.hair_volume * 0.6, fw + f.hair_volume, fh + f.hair_volume * 0.8
        )
        if hair_window is not None:
            hx = X[hair_window] - outline_dx
            hairline = f.hairline_y + f.hairline_curve * hx * hx + f.hairline_slope * hx
            above = np.clip((hairline - Y[hair_window]) / (2 * canvas.pixel) + 0.5, 0, 1)
            canvas.paint(hair_window, hair_alpha * above, f.hair)

    # Eyes: socket shadow, dark lid rim, sclera, iris and pupil clipped to the sclera.
    eye_h = f.eye_height * n.eye_open
    for side in (-1, 1):
        ex = feature_dx + side * f.eye_spacing * squash
        ey = f.eye_y
        tilt = side * f.eye_tilt
        near = 1 + 0.25 * side * n.yaw  # the eye nearer the camera looks larger
        ew = f.eye_width * squash * near
        canvas.paint_ellipse(skin * 0.8, ex, ey - 0.01, ew * 1.5, f.eye_height * 2.0, tilt, opacity=0.5)
        canvas.paint_ellipse((25, 20, 20), ex, ey, ew + f.lid_thickness, eye_h + f.lid_thickness, tilt)
        sclera_window, sclera_alpha = canvas.ellipse(ex, ey, ew, max(eye_h, 1e-3), tilt)
        if sclera_window is None:
            continue
        canvas.paint(sclera_window, sclera_alpha, _SCLERA)
        ix, iy = ex + n.gaze[0] * ew * 0.4, ey + n.gaze[1] * eye_h * 0.4
        _, iris_alpha = canvas.ellipse(ix, iy, f.iris_radius * near, f.iris_radius * near, window=sclera_window)
        canvas.paint(sclera_window, iris_alpha * sclera_alpha, f.iris)
        _, pupil_alpha = canvas.ellipse(ix, iy, f.iris_radius * 0.45, f.iris_radius * 0.45, window=sclera_window)
        canvas.paint(sclera_window, pupil_alpha * sclera_alpha, (10, 8, 8))

    for side in (-1, 1):  # brows: thick arcs tilted outward
        bx = feature_dx + side * (f.eye_spacing + 0.02) * squash
        by = f.eye_y - f.brow_gap - n.brow_raise
        canvas.paint_ellipse(
            f.brow_colour, bx, by, f.brow_length * squash, f.brow_thickness, -side * f.brow_angle, bend=f.brow_arch * 2
        )

    # Nose: bridge shadow, bright tip, shadow under it, nostrils.
    nx = feature_dx * 1.15
    bridge_y = f.nose_y - f.nose_length * 0.45
    canvas.paint_ellipse(skin * 0.7, nx, bridge_y, f.nose_width * 0.3, f.nose_length * 0.5, opacity=0.35)
    canvas.paint_ellipse(skin * 0.75, nx, f.nose_y + 0.035, f.nose_width, 0.03, opacity=0.45)
    canvas.paint_ellipse(np.minimum(skin * 1.08, 255), nx, f.nose_y, f.nose_width * 0.6, f.nose_width * 0.4,
                         opacity=0.6)
    for side in (-1, 1):
        canvas.paint_ellipse(skin * 0.35, nx + side * f.nose_width * 0.45, f.nose_y + 0.03, 0.024, 0.013)

    # Mouth: lips bent by the smile, a dark gap when open.
    smile = f.smile + n.smile
    mouth_x = feature_dx
    bend = smile / max(f.mouth_width, 1e-3)
    mw = f.mouth_width * squash
    if f.moustache:
        canvas.paint_ellipse(f.hair, mouth_x, f.mouth_y - f.upper_lip - 0.04, mw * 1.05, 0.035, bend=bend, opacity=0.9)
    gap = n.mouth_open
    upper_y, lower_y = f.mouth_y - gap / 2 - f.upper_lip / 2, f.mouth_y + gap / 2 + f.lower_lip / 2
    canvas.paint_ellipse(f.lip_colour, mouth_x, upper_y, mw, f.upper_lip, bend=bend)
    canvas.paint_ellipse(f.lip_colour * 1.05, mouth_x, lower_y, mw * 0.88, f.lower_lip, bend=bend)
    if gap > 0.004:
        canvas.paint_ellipse((55, 20, 25), mouth_x, f.mouth_y, mw * 0.85, gap / 2, bend=bend)

    if f.glasses is not None:
        for side in (-1, 1):
            gx = feature_dx + side * f.eye_spacing * squash
            window, outer = canvas.ellipse(gx, f.eye_y, 0.16 * squash, 0.12)
            if window is not None:
                _, inner = canvas.ellipse(gx, f.eye_y, 0.16 * squash - 0.022, 0.12 - 0.022, window=window)
                canvas.paint(window, outer * (1 - inner), f.glasses)
        canvas.paint_ellipse(f.glasses, feature_dx, f.eye_y - 0.03, f.eye_spacing * squash - 0.14, 0.012)

    for cx, cy, w, h, angle, colour in n.occluders:
        window, alpha = canvas.ellipse(cx, cy, w / 2, h / 2, angle)
        if window is not None:
            # A soft-cornered rectangle: an ellipse is too round to look like a band or a mask.
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = X[window] - cx, Y[window] - cy
            box = np.maximum(np.abs(c * dx + s * dy) / (w / 2), np.abs(-s * dx + c * dy) / (h / 2))
            canvas.paint(window, np.clip((1 - box) * (min(w, h) / 2 / canvas.pixel) + 0.5, 0, 1), colour)

    # Light: directional gradient, gain, colour cast, gamma.
    lx, ly, strength = n.light_direction
    light = n.light_gain * (1 + strength * (lx * X + ly * Y))
    rgb = canvas.rgb * light[..., None] * n.colour_cast
    gamma_table = (255.0 * (np.arange(256) / 255.0) ** n.gamma + 0.5).astype(np.uint8)
    image = gamma_table[np.clip(rgb, 0, 255).astype(np.uint8)]
    if n.blur > 1.0:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(n.blur)))
    elif n.blur > 0.3:
        # Mild blur: one box filter with the same variance, r(r+1)/3 = sigma^2, is 3x cheaper.
        radius = (math.sqrt(1 + 12 * n.blur**2) - 1) / 2
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.BoxBlur(radius)))
    if n.noise > 0.5:
        image = np.clip(image + n.noise * _noise_field(n.noise_seed, size), 0, 255).astype(np.uint8)
    return image


_NOISE_BANK: dict[int, np.ndarray] = {}


def _noise_field(seed: int, size: int) -> np.ndarray:
    """Unit Gaussian noise [size, size, 3]: a rolled field from a fixed bank, ~10x cheaper than drawing it."""
    if size not in _NOISE_BANK:
        _NOISE_BANK[size] = np.random.default_rng(20261128).standard_normal((8, size, size, 3), dtype=np.float32)
    bank = _NOISE_BANK[size]
    pick, dy, dx = seed % len(bank), (seed >> 8) % size, (seed >> 20) % size
    return np.roll(bank[pick], (dy, dx), axis=(0, 1))


# -- sets of samples ----------------------------------------------------------------------------


def identity_of(seed: int, identity: int, role: int = TRAIN_ROLE) -> FaceIdentity:
    return random_identity(np.random.default_rng([seed, role, _IDENTITY_STREAM, identity]))


def render_sample(
    seed: int, identity: int, sample: int, hard: bool, difficulty: float = 1.0, role: int = TRAIN_ROLE
) -> np.ndarray:
    """Sample ``sample`` of identity ``identity``: the same pixels whatever else is rendered."""
    rng = np.random.default_rng([seed, role, _SAMPLE_STREAM, identity, sample])
    return render_face(identity_of(seed, identity, role), random_nuisance(rng, hard, difficulty))


def hard_sample_mask(seed: int, num_samples: int, hard_share: float, role: int = TRAIN_ROLE) -> np.ndarray:
    """bool [num_samples]: exactly round(hard_share * num_samples) hard samples, spread at random."""
    if not 0.0 <= hard_share <= 1.0:
        raise CdfaceError(f"hard share must be between 0 and 1, got {hard_share}.")
    mask = np.zeros(num_samples, dtype=bool)
    order = np.random.default_rng([seed, role, _HARD_STREAM]).permutation(num_samples)
    chosen = order[: round(hard_share * num_samples)]
    mask[chosen] = True
    return mask


@dataclass(frozen=True)
class SyntheticSpec:
    identities: int
    per_identity: int
    hard_share: float = 0.1
    seed: int = 0
    difficulty: float = 1.0

    def __post_init__(self) -> None:
        if self.identities < 1 or self.per_identity < 1:
            raise CdfaceError(
                f"need at least one identity and one image per identity, got {self.identities} x {self.per_identity}."
            )
        if self.difficulty < 0:
            raise CdfaceError(f"difficulty must be >= 0, got {self.difficulty}.")
        hard_sample_mask(self.seed, 0, self.hard_share)  # validates the share


def iter_training_samples(spec: SyntheticSpec) -> Iterator[tuple[int, np.ndarray, bool]]:
    """(label, uint8 image, hard) in dataset order: identity-major, sample index = label * per_identity + j."""
    hard = hard_sample_mask(spec.seed, spec.identities * spec.per_identity, spec.hard_share)
    for label in range(spec.identities):
        identity = identity_of(spec.seed, label)
        for j in range(spec.per_identity):
            index = label * spec.per_identity + j
            rng = np.random.default_rng([spec.seed, TRAIN_ROLE, _SAMPLE_STREAM, label, j])
            is_hard = bool(hard[index])
            yield label, render_face(identity, random_nuisance(rng, is_hard, spec.difficulty)), is_hard


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_manifest(out: Path, spec: SyntheticSpec, data_format: str, hard_indices: list[int]) -> None:
    # The ground truth of which samples are hard lets a run check what its difficulty score finds.
    manifest = {"format": data_format, **asdict(spec), "hard_samples": hard_indices}
    atomic_write_text(out / "synthetic.json", json.dumps(manifest, indent=1) + "\n")


def write_folder(out: str | os.PathLike, spec: SyntheticSpec, jpeg_quality: int = 90) -> Path:
    """``out/id_000000/0000.jpg``...; folder names sort in label order. Returns ``out``.

    Images are plain writes (an fsync per image would dominate the run); ``synthetic.json`` is
    written atomically last, so its presence marks a complete set.
    """
    out = Path(out)
    hard_indices: list[int] = []
    for index, (label, image, hard) in enumerate(iter_training_samples(spec)):
        if hard:
            hard_indices.append(index)
        j = index - label * spec.per_identity
        identity_dir = out / f"id_{label:06d}"
        if j == 0:
            identity_dir.mkdir(parents=True, exist_ok=True)
        (identity_dir / f"{j:04d}.jpg").write_bytes(encode_jpeg(image, jpeg_quality))
    _write_manifest(out, spec, "folder", hard_indices)
    return out


def write_recordio(out_dir: str | os.PathLike, spec: SyntheticSpec, jpeg_quality: int = 90) -> Path:
    """``out_dir/train.rec`` + ``train.idx`` in the InsightFace layout (image key = sample index + 1)."""
    out_dir = Path(out_dir)
    hard_indices: list[int] = []

    def encoded() -> Iterator[tuple[int, bytes]]:
        for index, (label, image, hard) in enumerate(iter_training_samples(spec)):
            if hard:
                hard_indices.append(index)
            yield label, encode_jpeg(image, jpeg_quality)

    write_face_recordio(out_dir, encoded())
    _write_manifest(out_dir, spec, "recordio", hard_indices)
    return out_dir


def verification_pairs(
    seed: int, identities: int, pairs: int, hard_share: float = 0.1, difficulty: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [2P, 112, 112, 3], bool [P]) from verification identities, disjoint from training ones.

    Same and different pairs alternate, so every contiguous fold of a 10-fold protocol is balanced.
    """
    if identities < 2 or pairs < 1:
        raise CdfaceError(f"a verification set needs at least 2 identities and 1 pair, got {identities} and {pairs}.")
    rng = np.random.default_rng([seed, VAL_ROLE, _PAIR_STREAM])
    hard = hard_sample_mask(seed, 2 * pairs, hard_share, role=VAL_ROLE)
    parameters: dict[int, FaceIdentity] = {}
    images = np.empty((2 * pairs, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    issame = np.arange(pairs) % 2 == 0
    for pair in range(pairs):
        first = int(rng.integers(identities))
        second = first if issame[pair] else int((first + rng.integers(1, identities)) % identities)
        for slot, identity in enumerate((first, second)):
            if identity not in parameters:
                parameters[identity] = identity_of(seed, identity, VAL_ROLE)
            position = 2 * pair + slot
            sample_rng = np.random.default_rng([seed, VAL_ROLE, _SAMPLE_STREAM, identity, position])
            nuisance = random_nuisance(sample_rng, bool(hard[position]), difficulty)
            images[position] = render_face(parameters[identity], nuisance)
    return images, issame


def write_verification_bin(
    path: str | os.PathLike, seed: int, identities: int, pairs: int, hard_share: float = 0.1, difficulty: float = 1.0,
    jpeg_quality: int = 90,
) -> Path:
    """A verification ``.bin`` (InsightFace format) of held-out synthetic identities."""
    images, issame = verification_pairs(seed, identities, pairs, hard_share, difficulty)
    write_bin(path, [encode_jpeg(image, jpeg_quality) for image in images], issame.tolist())
    return Path(path)
