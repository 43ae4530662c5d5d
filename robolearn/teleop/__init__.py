"""Teleoperation: record demonstrations (and corrections of a running policy) with a keyboard, a SpaceMouse or a
gamepad in MuJoCo's viewer, into the same episode store scripted collection writes.

- :mod:`~robolearn.teleop.controls`: key bindings and the controls text of ``--help``;
- :mod:`~robolearn.teleop.devices`: input devices, the event log and the replay device;
- :mod:`~robolearn.teleop.tasks`: operator twist -> each task's action, and the viewer's starting camera;
- :mod:`~robolearn.teleop.session`: the per-tick state machine and recorder, plain and intervention (policy) mode;
- :mod:`~robolearn.teleop.viewer`, :mod:`~robolearn.teleop.display`: the MuJoCo viewer window, X11 checks, Xvfb
  and screenshots.

Like the rest of ``robolearn`` it never imports ``sim``: the CLI (``robolearn teleop``) hands it the environment.
Nothing is imported here, so ``robolearn --help`` stays fast.
"""
