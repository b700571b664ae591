"""The seed's parallel pipeline on ZeroMQ: one producer (ventilator), several workers, one sink."""
