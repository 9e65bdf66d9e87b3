"""Finds faces in a photo and turns each into a 48x48 grayscale FER-2013 input.

Uses OpenCV's frontal-face Haar cascade, which ships inside opencv-python-headless, so it
works offline. The models were trained on tightly cropped 48x48 grayscale faces, so a photo
must be cut down to that before it is sent to the server.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import cv2
import numpy as np

from fer_pipeline.core.contract import IMAGE_SIZE
from fer_pipeline.core.errors import InputDataError

CASCADE_FILE = "haarcascade_frontalface_default.xml"


@dataclass
class FaceDetectionConfig:
    scale_factor: float = 1.1      # image pyramid step of the cascade
    min_neighbors: int = 5         # higher: fewer false faces, more missed ones
    min_size: int = 24             # smallest face side in pixels (the cascade's window)


@dataclass
class Face:
    box: tuple[int, int, int, int]   # x, y, width, height in the original image
    pixels: np.ndarray                # uint8 [48, 48]


@functools.lru_cache(maxsize=1)
def _cascade() -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, CASCADE_FILE)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"cannot load OpenCV's face cascade from {path}")
    return cascade


def read_grayscale(path: str) -> np.ndarray:
    """Any image OpenCV reads (PNG, JPEG, ...) as uint8 grayscale; ValueError if unreadable."""
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputDataError(f"{path}: not a readable image file")
    return image


def decode_grayscale(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes (read from anywhere, e.g. an object store) as uint8 grayscale;
    ValueError naming `name` if OpenCV cannot decode them."""
    image = None
    if data:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InputDataError(f"{name}: not a readable image file")
    return image


def to_model_input(gray: np.ndarray) -> np.ndarray:
    """Resizes a grayscale crop to 48x48 (INTER_AREA: the right filter for shrinking)."""
    interpolation = cv2.INTER_AREA if min(gray.shape[:2]) >= IMAGE_SIZE else cv2.INTER_LINEAR
    return cv2.resize(gray, (IMAGE_SIZE, IMAGE_SIZE), interpolation=interpolation)


def find_faces(gray: np.ndarray, config: FaceDetectionConfig = FaceDetectionConfig()
               ) -> list[Face]:
    """Every detected face, largest first, each cropped and resized to 48x48."""
    boxes = _cascade().detectMultiScale(
        cv2.equalizeHist(gray), scaleFactor=config.scale_factor,
        minNeighbors=config.min_neighbors, minSize=(config.min_size, config.min_size))
    faces = []
    for x, y, w, h in sorted((tuple(int(v) for v in b) for b in boxes),
                             key=lambda b: -b[2] * b[3]):
        faces.append(Face((x, y, w, h), to_model_input(gray[y:y + h, x:x + w])))
    return faces


def faces_in_file(path: str, config: FaceDetectionConfig = FaceDetectionConfig()
                  ) -> list[Face]:
    """Faces in an image file. A file that already is a 48x48 face is used as it is."""
    return faces_in_image(read_grayscale(path), config)


def faces_in_image(gray: np.ndarray, config: FaceDetectionConfig = FaceDetectionConfig()
                   ) -> list[Face]:
    """Faces in a grayscale image. An image that already is a 48x48 face is used as it is."""
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return [Face((0, 0, IMAGE_SIZE, IMAGE_SIZE), gray)]
    return find_faces(gray, config)
