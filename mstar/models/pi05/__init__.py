"""Pi0.5 (openpi / ``lerobot/pi05_base``): a vision-language-action model that turns camera images,
a task instruction and the robot state into a chunk of 50 x 32 robot actions by flow matching."""
