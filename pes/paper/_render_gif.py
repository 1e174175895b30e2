"""Child process of :func:`pes.paper.swimmer_view.write_gif`: render physics states to a
GIF. Run as a script (``python _render_gif.py MODEL.xml STATES.npy OUT.gif FPS EVERY WxH``)
so that MuJoCo is imported fresh, with the MUJOCO_GL the parent chose, and without importing
pes (and JAX) at all."""

import sys

import mujoco
import numpy as np
from PIL import Image


def render(xml: str, states: np.ndarray, width: int, height: int, every: int) -> list:
    """[T, nphys] mjSTATE_FULLPHYSICS | mjSTATE_WARMSTART states (the swimmer task's) -> RGB
    frames from the 'track' camera."""
    model = mujoco.MjModel.from_xml_string(xml)
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
    model.vis.global_.offheight = max(model.vis.global_.offheight, height)
    data = mujoco.MjData(model)
    spec = int(mujoco.mjtState.mjSTATE_FULLPHYSICS) | int(mujoco.mjtState.mjSTATE_WARMSTART)
    frames = []
    with mujoco.Renderer(model, height, width) as renderer:
        for state in states[::every]:
            mujoco.mj_setState(model, data, np.ascontiguousarray(state), spec)
            mujoco.mj_forward(model, data)
            renderer.update_scene(data, camera="track")
            frames.append(Image.fromarray(renderer.render().copy()))
    return frames


def main(argv: list[str]) -> int:
    xml_path, states_path, out, fps, every, size = argv
    width, height = (int(v) for v in size.split("x"))
    with open(xml_path) as f:
        frames = render(f.read(), np.load(states_path), width, height, int(every))
    frames[0].save(out, save_all=True, append_images=frames[1:], loop=0,
                   duration=int(round(1000 / float(fps))), optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
