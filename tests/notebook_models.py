"""The seed notebook's two models at tiny size, saved as the notebook saved them (.h5).

The notebook's CNN takes (48, 48, 1) floats (pixels / 255): 4 x (Conv2D 3x3 relu,
MaxPool 2x2), Flatten, Dense 256 -> Dropout -> Dense 128 -> Dropout -> Dense 7 softmax.
Its VGG16 takes (48, 48, 3): five VGG blocks (2, 2, 3, 3, 3 convolutions, 'same' padding,
each block ending in a 2x2 max-pool), Flatten, Dense 4096 -> 4096 -> 7 softmax. Here every
width is divided down (a few filters, a few units) so a file is kilobytes and loads in
well under a second; the layer structure, input and output are the notebook's. Both end in
the 7-way softmax in FER-2013's class order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

CNN_FILTERS = (4, 4, 8, 8)                  # the notebook: 64, 128, 256, 512
CNN_UNITS = (16, 8)                         # the notebook: 256, 128
VGG_BLOCKS = ((2, 2), (2, 4), (3, 4), (3, 8), (3, 8))   # (convolutions, filters)
VGG_UNITS = (16, 16)                        # the notebook: 4096, 4096


def notebook_cnn(input_shape: Sequence[int] = (48, 48, 1), seed: int = 0):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(shape=tuple(input_shape))], name="modelo_cnn")
    for filters in CNN_FILTERS:
        model.add(layers.Conv2D(filters, (3, 3), activation="relu"))
        model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Flatten())
    for units in CNN_UNITS:
        model.add(layers.Dense(units, activation="relu"))
        model.add(layers.Dropout(0.5))
    model.add(layers.Dense(7, activation="softmax"))
    return model


def notebook_vgg(input_shape: Sequence[int] = (48, 48, 3), seed: int = 0,
                 final_activation: str = "softmax"):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=tuple(input_shape))
    x = inputs
    for block, (convolutions, filters) in enumerate(VGG_BLOCKS, start=1):
        for i in range(1, convolutions + 1):
            x = layers.Conv2D(filters, (3, 3), activation="relu", padding="same",
                              name=f"block{block}_conv{i}")(x)
        x = layers.MaxPooling2D((2, 2), name=f"block{block}_pool")(x)
    x = layers.Flatten()(x)
    for units in VGG_UNITS:
        x = layers.Dense(units, activation="relu")(x)
    outputs = layers.Dense(7, activation=final_activation)(x)
    return keras.Model(inputs, outputs, name="modelo_vgg")


def fit_a_step(model, seed: int = 0) -> None:
    """One optimizer step on random faces (pixels / 255), as a trained file would have had."""
    rng = np.random.default_rng(seed)
    shape = (8, *model.input_shape[1:])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(rng.integers(0, 256, shape).astype("float32") / 255.0,
              rng.integers(0, 7, 8), epochs=1, batch_size=8, verbose=0)


def save_h5(model, path: str) -> str:
    """Saved as the notebook did (`model.save("modelo_cnn.h5")`: legacy HDF5)."""
    import warnings

    with warnings.catch_warnings():
        # Keras 3 calls HDF5 legacy when saving one; the notebook's files are HDF5.
        warnings.simplefilter("ignore", UserWarning)
        model.save(path)
    return path
