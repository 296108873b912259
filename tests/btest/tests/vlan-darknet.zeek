# Real traffic (Traces/vnc-scanner.pcap: 5 scanners, 20 VNC servers), tagged by
# Scripts/vlan-tag.py with one 802.1Q tag or an 802.1ad+802.1Q pair (QinQ),
# and a darknet of 136.159.80.0/20: one handshake per answered SYN inside it,
# with its VLAN tags, and none for the servers outside, answered or not.
# Checked on Zeek 8.0.10 and 7.0.11.
#
# @TEST-EXEC: python3 $SCRIPTS/vlan-tag.py $TRACES/vnc-scanner.pcap vlan.pcap
# @TEST-EXEC: zeek -b -C -r vlan.pcap $PACKAGE %INPUT > output
# @TEST-EXEC: btest-diff output

# Set, not added to: zkg runs this suite after its build step wrote the
# operator's settings into site.zeek, which the package loads.
redef StepStone::darknet_subnets = {136.159.80.0/20};
redef StepStone::websocket_port = 0/tcp;

global syn: table[bool] of set[string] = {
	[T] = set(),
	[F] = set()
};
global synack: table[bool] of set[string] = {
	[T] = set(),
	[F] = set()
};
global published: table[bool] of count = {
	[T] = 0,
	[F] = 0
};

event connection_SYN_packet(c: connection, pkt: SYN_packet)
	{
	local inside = c$id$resp_h in 136.159.80.0/20;
	if ( pkt$is_orig )
		add syn[inside][c$uid];
	else
		add synack[inside][c$uid];
	}

event StepStone::handshake(h: StepStone::HandshakeInfo)
	{
	++published[h$resp_h in 136.159.80.0/20];
	print fmt("%s %s -> %s %s tp=%s vlan=%s inner_vlan=%s eth_type=0x%x syn=%d",
	    h$uid, h$orig_h, h$resp_h, h$reply, h?$tp ? fmt("%.6f",
	    interval_to_double(h$tp)) : "-", h?$vlan ? cat(h$vlan) : "-",
	    h?$inner_vlan ? cat(h$inner_vlan) : "-", h$eth_type, |decode_base64(
	    h$syn)|);
	}

function summary(inside: bool)
	{
	print fmt("%s the darknet: %d connections with a SYN, %d with a SYN+ACK, %d handshakes published",
	    inside ? "inside" : "outside", |syn[inside]|, |synack[inside]|,
	    published[inside]);
	}

event zeek_done()
	{
	summary(T);
	summary(F);
	}
