"""Simulated patients and devices, so QA can drive the whole system with no hardware.

    physiology   pure, seeded models: baselines, clinical scenarios, what each device measures
    devices      one real paho MQTT client per device, with the faults field devices show
    runner       the fleet, its scheduler, and the ``firstcare simulate`` command line
"""
