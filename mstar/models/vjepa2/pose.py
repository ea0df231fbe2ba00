"""End-effector pose arithmetic of the V-JEPA 2-AC planning code, in torch.

A pose is ``[x, y, z, roll, pitch, yaw, gripper]`` with extrinsic ``xyz``
Euler angles (scipy's ``"xyz"``); an action is the delta between two poses:
xyz difference, the Euler angles of ``R_next @ R_prev.T``, and the gripper
difference. :func:`next_pose` applies an action (the planner's
``compute_new_pose``: gripper clipped to [0, 1]); :func:`pose_deltas` turns a
pose sequence into the actions between them (the DROID loader's
``poses_to_diffs``).
"""

from __future__ import annotations

import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "next_pose", "pose_deltas"]


def euler_to_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Extrinsic xyz Euler angles [..., 3] -> rotation matrices [..., 3, 3] (R = Rz @ Ry @ Rx)."""
    a = angles.double()
    cx, cy, cz = a[..., 0].cos(), a[..., 1].cos(), a[..., 2].cos()
    sx, sy, sz = a[..., 0].sin(), a[..., 1].sin(), a[..., 2].sin()
    rows = [
        [cy * cz, sx * sy * cz - cx * sz, cx * sy * cz + sx * sz],
        [cy * sz, sx * sy * sz + cx * cz, cx * sy * sz - sx * cz],
        [-sy, sx * cy, cx * cy],
    ]
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def matrix_to_euler(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> extrinsic xyz Euler angles [..., 3] (pitch in [-pi/2, pi/2])."""
    pitch = torch.asin((-m[..., 2, 0]).clamp(-1.0, 1.0))
    roll = torch.atan2(m[..., 2, 1], m[..., 2, 2])
    yaw = torch.atan2(m[..., 1, 0], m[..., 0, 0])
    # Gimbal lock: roll and yaw are not separable; put it all in roll (yaw = 0), as scipy does.
    locked = m[..., 2, 0].abs() > 1.0 - 1e-9
    if bool(locked.any()):
        sign = torch.sign(-m[..., 2, 0])
        roll = torch.where(locked, torch.atan2(sign * m[..., 0, 1], m[..., 1, 1]), roll)
        yaw = torch.where(locked, torch.zeros_like(yaw), yaw)
    return torch.stack([roll, pitch, yaw], dim=-1)


def next_pose(pose: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Apply actions [..., 7] to poses [..., 7]."""
    rot = euler_to_matrix(action[..., 3:6]) @ euler_to_matrix(pose[..., 3:6])
    out = torch.cat(
        [
            pose[..., :3].double() + action[..., :3].double(),
            matrix_to_euler(rot),
            (pose[..., 6:].double() + action[..., 6:].double()).clamp(0.0, 1.0),
        ],
        dim=-1,
    )
    return out.to(pose.dtype)


def pose_deltas(poses: torch.Tensor) -> torch.Tensor:
    """Poses [T, 7] -> the actions [T-1, 7] that lead from each pose to the next."""
    rot = euler_to_matrix(poses[:, 3:6])
    diff = rot[1:] @ rot[:-1].transpose(-1, -2)
    out = torch.cat(
        [(poses[1:, :3] - poses[:-1, :3]).double(), matrix_to_euler(diff), (poses[1:, 6:] - poses[:-1, 6:]).double()],
        dim=-1,
    )
    return out.to(poses.dtype)
