##! Verdicts from the analyzer: one stepstone.log line each, a
##! StepStone::Relay_Detected notice for those that meet *notice_rule*, and a
##! StepStone::Relay_Cleared notice when a noticed source stops meeting it.
##!
##! Notice fields checked against zeek/zeek
##! scripts/base/frameworks/notice/main.zeek (6.0 to 8.x): $note, $msg, $sub,
##! $src, $identifier; suppression is keyed on note + identifier. The
##! identifier is the source and the start of its flagging, so a source gets
##! one notice of each kind per Notice::default_suppression_interval (1 hr)
##! within one flagging, and a source flagged again after a clearing is
##! noticed again (else notice.log would end on its clearing).

@load base/frameworks/notice
@load ./main
@load ./transport

module StepStone;

# A source that meets *notice_rule*: since when, without a clearing between.
type Flagging: record {
	since: time;
	## This node's count of flaggings when it began: tells two flaggings
	## apart even at one network time.
	n: count;
};

global flaggings = 0;

# Sources that met *notice_rule*, forgotten *flag_memory* after the last
# verdict that did. Only the node that handles verdicts (the manager, or a
# standalone node) fills it.
global flagged: table[addr] of Flagging &write_expire=flag_memory;

# The notices' identifier: one flagging of one source.
function flagging_id(src: addr, f: Flagging): string
	{
	return fmt("%s/%d", src, f$n);
	}

function ms(i: interval): string
	{
	return fmt("%.3f ms", interval_to_double(i) * 1000.0);
	}

# The Verdict's app_margin (microseconds) as an interval.
function app_interval(us: double): interval
	{
	return double_to_interval(us / 1000000.0);
	}

function conditions(v: Verdict): string
	{
	if ( v$cond_os && v$cond_timing )
		return "conditions: os, timing";
	if ( v$cond_os )
		return "conditions: os";
	if ( v$cond_timing )
		return "conditions: timing";
	return "conditions: none";
	}

# The rules under notice_rule that the verdict meets, "" for none. A verdict
# without relay_confident (an older analyzer) is judged by the paper's rule.
function noticed_by(v: Verdict): string
	{
	local confident = v?$relay_confident && v$relay_confident;
	local paper = v$relay;

	switch ( notice_rule )
		{
		case CONFIDENT:
			if ( v?$relay_confident )
				return confident ? "confident" : "";
			return paper ? "paper (no confident verdict from the analyzer)" : "";
		case PAPER:
			return paper ? "paper" : "";
		case EITHER:
			if ( confident && paper )
				return "confident+paper";
			if ( confident )
				return "confident";
			return paper ? "paper" : "";
		}
	return "";
	}

# The confident rule's evidence: the timing margin against its threshold,
# and the OS mismatches.
function confident_evidence(v: Verdict): string
	{
	local parts: vector of string = vector();

	if ( v?$timing_margin && v?$timing_threshold )
		{
		local held = v?$cond_timing_strong && v$cond_timing_strong;
		parts += fmt("timing margin %s %s threshold %s (%s reference, %d samples)", ms(
		    v$timing_margin), held ? ">" : "<=", ms(v$timing_threshold),
		    v?$timing_ref ? v$timing_ref : "?", v?$timing_samples ?
		    v$timing_samples : 0);
		}
	else
		parts += "no timing reference";

	if ( v?$cond_hops && v$cond_hops )
		parts += fmt("hops +%.1f over %d measurements", v?$hops_margin ? v$hops_margin :
		    0.0, v?$hops_samples ? v$hops_samples : 0);

	if ( v?$cond_app && v$cond_app )
		parts += fmt("application RTT margin %s over %d answers", v?$app_margin ? ms(
		    app_interval(v$app_margin)) : "?", v?$app_samples ?
		    v$app_samples : 0);

	if ( v$cond_os )
		parts += fmt("OS mismatch in %d measurements", v?$os_mismatches ?
		    v$os_mismatches : 1);

	return join_string_vec(parts, ", ");
	}

# What the verdict found, for $sub: "kind forwarding (hops=+1/5); " or "" for
# an analyzer that sends no kind.
function kind_prefix(v: Verdict): string
	{
	if ( ! v?$kind )
		return "";
	if ( v?$evidence && |v$evidence| > 0 )
		return fmt("kind %s (%s); ", v$kind, join_string_vec(v$evidence, ", "));
	return fmt("kind %s; ", v$kind);
	}

# The paper's evidence: its conditions and the margin of its mean comparison.
function paper_evidence(v: Verdict): string
	{
	local s = conditions(v);

	if ( v?$tp_mean && v?$ta_max_mean )
		s = fmt("%s; mean T^p %s - mean max ping %s = %s", s, ms(v$tp_mean), ms(
		    v$ta_max_mean), ms(v$tp_mean - v$ta_max_mean));

	return s;
	}

# rule_evidence without the kind.
function rule_evidence_only(v: Verdict, rule: string): string
	{
	if ( rule == "confident+paper" )
		return fmt("rule confident+paper: %s; %s", confident_evidence(v),
		    paper_evidence(v));
	if ( rule == "confident" )
		return fmt("rule confident: %s", confident_evidence(v));
	if ( rule != "" )
		{
		if ( v?$relay_confident )
			return fmt("rule %s: %s; confident rule not met: %s", rule, paper_evidence(v),
			    confident_evidence(v));
		return fmt("rule %s: %s", rule, paper_evidence(v));
		}

	# A clearing: what no longer holds under notice_rule.
	if ( notice_rule == PAPER || ! v?$relay_confident )
		return fmt("rule paper not met: %s", paper_evidence(v));
	if ( notice_rule == CONFIDENT )
		return fmt("rule confident not met: %s", confident_evidence(v));
	return fmt("neither rule met: %s; %s", confident_evidence(v), paper_evidence(v));
	}

# $sub of a notice: what the verdict found (its kind and evidence), then the
# rule that fired, or for a clearing the rule that no longer holds, with its
# margin. Where the confident rule was not the one that fired, its evidence
# follows, so the margin it missed by is in view.
function rule_evidence(v: Verdict, rule: string): string
	{
	return kind_prefix(v) + rule_evidence_only(v, rule);
	}

function log_line(v: Verdict): Info
	{
	local rec = Info($ts=network_time(), $src=v$src, $relay=v$relay,
	    $cond_os=v$cond_os, $cond_timing=v$cond_timing, $samples=v$samples,
	    $reasons=v$reasons);

	if ( v?$tp_mean )
		rec$tp_mean = v$tp_mean;
	if ( v?$ta_max_mean )
		rec$ta_max_mean = v$ta_max_mean;
	if ( v?$t )
		rec$syn_ts = v$t;
	if ( v?$dst )
		rec$dst = v$dst;
	if ( v?$tp )
		rec$tp = v$tp;
	if ( v?$ping_min )
		rec$ping_min = v$ping_min;
	if ( v?$ping_avg )
		rec$ping_avg = v$ping_avg;
	if ( v?$ping_max )
		rec$ping_max = v$ping_max;
	if ( v?$fp )
		rec$fp = v$fp;
	if ( v?$fa )
		rec$fa = v$fa;
	if ( v?$relay_confident )
		rec$relay_confident = v$relay_confident;
	if ( v?$timing_margin )
		rec$timing_margin = v$timing_margin;
	if ( v?$timing_threshold )
		rec$timing_threshold = v$timing_threshold;
	if ( v?$timing_ref )
		rec$timing_ref = v$timing_ref;
	if ( v?$timing_samples )
		rec$timing_samples = v$timing_samples;
	if ( v?$os_mismatches )
		rec$os_mismatches = v$os_mismatches;
	if ( v?$kind )
		rec$kind = v$kind;
	if ( v?$evidence )
		rec$evidence = v$evidence;
	if ( v?$hops_margin )
		rec$hops_margin = v$hops_margin;
	if ( v?$hops_samples )
		rec$hops_samples = v$hops_samples;
	if ( v?$app_margin )
		rec$app_margin = app_interval(v$app_margin);
	if ( v?$app_samples )
		rec$app_samples = v$app_samples;

	return rec;
	}

function handle_verdict(v: Verdict)
	{
	local rec = log_line(v);
	local rule = noticed_by(v);

	if ( rule == "" )
		{
		if ( v$src in flagged )
			{
			rec$change = "cleared";
			local f = flagged[v$src];
			delete flagged[v$src];
			Log::write(StepStone::LOG, rec);
			NOTICE([$note=Relay_Cleared, $src=v$src, $msg=fmt("%s is no longer a stepping stone under notice_rule %s (flagged since %s)",
			    v$src, notice_rule, strftime("%Y-%m-%dT%H:%M:%S",
			    f$since)), $sub=rule_evidence(v, rule),
			    $identifier=flagging_id(v$src, f)]);
			return;
			}

		Log::write(StepStone::LOG, rec);
		return;
		}

	rec$noticed_by = rule;
	if ( v$src !in flagged )
		{
		rec$change = "flagged";
		flagged[v$src] = Flagging($since=network_time(), $n=++flaggings);
		}
	else
		flagged[v$src] = flagged[v$src]; # a write: flag_memory counts from now
	Log::write(StepStone::LOG, rec);

	local tp_mean = v?$tp_mean ? ms(v$tp_mean) : "?";
	local ta_max_mean = v?$ta_max_mean ? ms(v$ta_max_mean) : "?";
	local tp = v?$tp ? ms(v$tp) : "?";
	local ping_max = v?$ping_max ? ms(v$ping_max) : "?";
	local fp = v?$fp ? v$fp : "unknown";
	local fa = v?$fa ? v$fa : "unknown";
	local msg = fmt("%s is a stepping stone: mean T^p %s vs mean max ping %s over %d samples; last T^p %s, max ping %s; SYN OS %s, probe OS %s",
	    v$src, tp_mean, ta_max_mean, v$samples, tp, ping_max, fp, fa);

	NOTICE([$note=Relay_Detected, $src=v$src, $msg=msg, $sub=rule_evidence(v,
	    rule), $identifier=flagging_id(v$src, flagged[v$src])]);
	}

event StepStone::verdict(v: Verdict)
	{
	handle_verdict(v);

	# Logged and noticed: the analyzer may let go of it.
	if ( v?$id )
		publish_verdict_ack(v$id);
	}
