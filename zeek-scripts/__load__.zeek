##! stepstone: tells which sources hitting a darknet are stepping stones (relays).
##!
##! Publishes one ``StepStone::handshake`` event per darknet connection to
##! ``StepStone::handshake_topic`` for the stepstone analyzer (Broker
##! WebSocket), and turns the analyzer's ``StepStone::verdict`` events into
##! ``stepstone.log`` and ``StepStone::Relay_Detected`` notices.

@load ./main
@load ./handshake
@load ./app
@load ./verdict
@load ./transport
@load ./site
