-- Route every stable study to the ACWI node (the "acwi" entry of
-- DicomModalities), without ever sending the node its own results back.
--
-- Which instances are the node's own output?  An instance is skipped when
-- EITHER of these holds:
--
--   1. its RemoteAET metadata (the calling AE title of the association that
--      delivered it, recorded by Orthanc for every instance received over
--      DICOM) equals the AE title of the "acwi" modality, i.e. the node's AE
--      title (compared without case, like Orthanc's default
--      "StrictAetComparison": false); or
--   2. its series' Manufacturer (0008,0070) is "ACWI Node", which the node
--      writes into every result object it creates.
--
-- Criterion 1 needs no cooperation from the result objects but only works
-- for results delivered by DICOM from the node itself; criterion 2 also
-- covers results that reach this Orthanc another way (STOW-RS, REST upload,
-- relayed by another PACS).  Either one alone is enough to stop a loop, so
-- both are applied.  The results' SeriesNumber (9901/9902) is deliberately
-- NOT used: modalities are free to use those numbers for their own series.
--
-- Loop guard: every instance that was forwarded successfully is tagged with
-- the user metadata "AcwiForwarded" (declared in "UserMetadata" of
-- orthanc.json).  When the node's results arrive in the same study, the
-- study becomes stable again and this callback runs again; instances already
-- tagged are not sent a second time, so a study is never bounced back and
-- forth.  An instance replaced by a new version (OverwriteInstances) loses
-- the tag and is forwarded again, which is intended: the content changed.
--
-- IOCM rejection notes: OnStoredInstance (below) deletes the node's results
-- that a rejection note of the node lists; see the comment above that
-- function.  The notes themselves are node results (Manufacturer "ACWI Node"),
-- so criterion 2 keeps OnStableStudy from ever forwarding them to the node.
--
-- Log lines only contain Orthanc identifiers (hashes) and counts, never
-- patient data.

local NODE_MODALITY = 'acwi'
local NODE_MANUFACTURER = 'ACWI Node'
local FORWARDED_METADATA = 'AcwiForwarded'

local function Trim(value)
  if value == nil then
    return ''
  end
  return (string.gsub(tostring(value), '^%s*(.-)%s*$', '%1'))
end

local function GetJson(uri)
  local answer = RestApiGet(uri)
  if answer == nil then
    return nil
  end
  return ParseJson(answer)
end

-- The node's AE title, as configured for the "acwi" modality.
local function NodeAet()
  local modality = GetJson('/modalities/' .. NODE_MODALITY .. '/configuration')
  if modality == nil then
    return nil
  end
  return string.upper(Trim(modality['AET']))
end

-- Forward what of a study is still to be sent; returns 'forwarded', 'nothing'
-- (nothing left to send), 'failed' (the C-STORE job failed: the node is down
-- or refused), 'gone' (the study was deleted) or 'unconfigured'.
local function ForwardStudy(studyId)
  local nodeAet = NodeAet()
  if nodeAet == nil or nodeAet == '' then
    print('ACWI routing: modality "' .. NODE_MODALITY .. '" is not configured; study '
          .. studyId .. ' not forwarded')
    return 'unconfigured'
  end

  local seriesList = GetJson('/studies/' .. studyId .. '/series')
  if seriesList == nil then
    print('ACWI routing: study ' .. studyId .. ' disappeared before routing')
    return 'gone'
  end

  local toSend = {}
  local fromNode = 0
  local alreadyForwarded = 0

  for _, series in ipairs(seriesList) do
    local manufacturer = Trim(series['MainDicomTags']['Manufacturer'])
    for _, instanceId in ipairs(series['Instances']) do
      local instanceMetadata = GetJson('/instances/' .. instanceId .. '/metadata?expand') or {}
      if manufacturer == NODE_MANUFACTURER
        or string.upper(Trim(instanceMetadata['RemoteAET'])) == nodeAet then
        fromNode = fromNode + 1
      elseif instanceMetadata[FORWARDED_METADATA] ~= nil then
        alreadyForwarded = alreadyForwarded + 1
      else
        table.insert(toSend, instanceId)
      end
    end
  end

  if #toSend == 0 then
    print('ACWI routing: study ' .. studyId .. ': nothing to forward ('
          .. fromNode .. ' node result(s), ' .. alreadyForwarded .. ' already forwarded)')
    return 'nothing'
  end

  local request = {}
  request['Resources'] = toSend
  request['Synchronous'] = true
  local answer = RestApiPost('/modalities/' .. NODE_MODALITY .. '/store',
                             DumpJson(request, true))
  if answer == nil then
    print('ACWI routing: study ' .. studyId .. ': C-STORE of ' .. #toSend
          .. ' instance(s) to "' .. NODE_MODALITY .. '" FAILED (see the job list);'
          .. ' tried again once the node answers')
    return 'failed'
  end

  local stamp = os.date('!%Y-%m-%dT%H:%M:%SZ')
  for _, instanceId in ipairs(toSend) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. FORWARDED_METADATA, stamp)
  end
  print('ACWI routing: study ' .. studyId .. ': forwarded ' .. #toSend .. ' instance(s), skipped '
        .. fromNode .. ' node result(s) and ' .. alreadyForwarded .. ' already forwarded')
  return 'forwarded'
end

-- Studies whose forward failed (the node down, restarting, refusing), by
-- Orthanc identifier, with the time of their first failure.  A study does
-- not become stable again by itself, so they are tried again after the next
-- stable study of any patient (OnStableStudy) and, where Orthanc calls it,
-- on OnHeartBeat ("LuaHeartBeatPeriod", Orthanc 1.11.1 and later), oldest
-- first.  Right after a forward that succeeded (the node is up) every one is
-- tried; otherwise the round stops at the first that fails again (the node
-- is still down: no point waiting for each one's timeout).  One that still
-- fails RETRY_FOR_S after its first failure is given up (logged).  The list
-- is kept in memory: a restart of Orthanc forgets it.
local RETRY_FOR_S = 7 * 24 * 3600
local pending = {}

local function RetryPending(nodeUp)
  local order = {}
  for studyId, since in pairs(pending) do
    table.insert(order, { studyId, since })
  end
  table.sort(order, function(x, y) return x[2] < y[2] end)
  for _, entry in ipairs(order) do
    local studyId, since = entry[1], entry[2]
    local outcome = ForwardStudy(studyId)
    if outcome == 'failed' then
      if os.time() - since > RETRY_FOR_S then
        pending[studyId] = nil
        print('ACWI routing: study ' .. studyId .. ': given up after '
              .. RETRY_FOR_S .. ' s of failed forwards (send it to the node by hand)')
      elseif not nodeUp then
        return  -- the node still does not answer: the others wait for the next round
      end
    else
      pending[studyId] = nil
    end
  end
end

function OnStableStudy(studyId, tags, metadata)
  local outcome = ForwardStudy(studyId)
  if outcome == 'failed' then
    if pending[studyId] == nil then
      pending[studyId] = os.time()
    end
    return
  end
  pending[studyId] = nil
  if outcome ~= 'unconfigured' then
    RetryPending(outcome == 'forwarded')
  end
end

function OnHeartBeat()
  RetryPending(false)
end

-- ------------------------------------------------------------------------
-- IOCM rejection notes.
--
-- Orthanc does not act on IHE IOCM rejection notes by itself.  The node
-- withdraws results by sending one: a Key Object Selection Document whose
-- document title (ConceptNameCodeSequence, CID 7011) is a rejection reason
-- and whose CurrentRequestedProcedureEvidenceSequence lists the rejected
-- instances.  When such a note is stored here AND its Manufacturer is
-- "ACWI Node", every instance it lists is deleted, but only when
--
--   * its series' Manufacturer and its own Manufacturer are "ACWI Node" (a
--     note must never delete the patient's source images), and
--   * it belongs to the same patient as the note (Orthanc's patient
--     identifier), and
--   * it is not the note itself.
--
-- Instances that are already gone (a note received twice) are counted, not
-- treated as an error.  The note itself stays stored: it is the record of the
-- rejection.  References whose UIDs are empty or not made of digits and dots
-- are ignored (an empty or wildcard value would match every instance in
-- /tools/find).
--
-- Orthanc 1.10 passes the instance's full simplified tags (sequences
-- included) as `tags`; the script still reads them with
-- /instances/{id}/tags?simplify when the sequences are missing.

local KOS_SOP_CLASS = '1.2.840.10008.5.1.4.1.1.88.59'
local REJECTION_TITLES = {
  ['113001'] = true,  -- Rejected for Quality Reasons
  ['113037'] = true,  -- Rejected for Patient Safety Reasons
  ['113038'] = true,  -- Incorrect Modality Worklist Entry
  ['113039'] = true,  -- Data Retention Policy Expired
}

-- A table, or an empty one for anything else (a missing or malformed tag).
local function Items(value)
  if type(value) == 'table' then
    return value
  end
  return {}
end

local function IsUid(value)
  return string.len(value) > 0 and string.len(value) <= 64
    and string.find(value, '^[0-9][0-9.]*$') ~= nil
end

-- The code value of the document title when it is one of the rejection
-- reasons above (coding scheme DCM), otherwise nil.
local function RejectionReason(tags)
  local title = Items(tags['ConceptNameCodeSequence'])[1]
  if type(title) ~= 'table' or Trim(title['CodingSchemeDesignator']) ~= 'DCM' then
    return nil
  end
  local code = Trim(title['CodeValue'])
  if REJECTION_TITLES[code] then
    return code
  end
  return nil
end

-- The rejected instances as {study UID, SOP Instance UID} pairs, and the
-- number of references ignored because a UID is malformed.
local function RejectedReferences(tags)
  local references = {}
  local malformed = 0
  for _, study in ipairs(Items(tags['CurrentRequestedProcedureEvidenceSequence'])) do
    local studyUid = Trim(Items(study)['StudyInstanceUID'])
    for _, series in ipairs(Items(Items(study)['ReferencedSeriesSequence'])) do
      for _, sop in ipairs(Items(Items(series)['ReferencedSOPSequence'])) do
        local sopUid = Trim(Items(sop)['ReferencedSOPInstanceUID'])
        if IsUid(studyUid) and IsUid(sopUid) then
          table.insert(references, { studyUid, sopUid })
        else
          malformed = malformed + 1
        end
      end
    end
  end
  return references, malformed
end

-- Orthanc identifier of the patient of an instance, or nil.
local function PatientOf(instanceId)
  local patient = GetJson('/instances/' .. instanceId .. '/patient')
  if patient == nil then
    return nil
  end
  return patient['ID']
end

-- Delete what a rejection note of the node lists; returns the counts.
local function ApplyRejection(noteId, tags)
  local counts = { deleted = 0, foreign = 0, otherPatient = 0, gone = 0, malformed = 0, failed = 0 }
  local notePatient = PatientOf(noteId)
  local references
  references, counts.malformed = RejectedReferences(tags)

  for _, reference in ipairs(references) do
    local query = {}
    query['Level'] = 'Instance'
    query['Query'] = { StudyInstanceUID = reference[1], SOPInstanceUID = reference[2] }
    query['Expand'] = true
    local answer = RestApiPost('/tools/find', DumpJson(query, true))
    local matches = {}
    if answer == nil then
      counts.failed = counts.failed + 1
    else
      matches = Items(ParseJson(answer))
    end
    if answer ~= nil and #matches == 0 then
      counts.gone = counts.gone + 1
    end

    for _, match in ipairs(matches) do
      local instanceId = match['ID']
      local series = GetJson('/series/' .. tostring(match['ParentSeries']))
      local study = nil
      if series ~= nil then
        study = GetJson('/studies/' .. tostring(series['ParentStudy']))
      end
      if instanceId == noteId then
        -- A note listing itself: it stays, it is the record of the rejection.
      elseif series == nil or study == nil then
        counts.gone = counts.gone + 1
      elseif Trim(Items(series['MainDicomTags'])['Manufacturer']) ~= NODE_MANUFACTURER then
        counts.foreign = counts.foreign + 1
      elseif notePatient == nil or study['ParentPatient'] ~= notePatient then
        counts.otherPatient = counts.otherPatient + 1
      else
        -- The series says "ACWI Node"; the instance itself must say so too.
        local own = GetJson('/instances/' .. instanceId .. '/tags?simplify')
        if own == nil then
          counts.gone = counts.gone + 1
        elseif Trim(own['Manufacturer']) ~= NODE_MANUFACTURER then
          counts.foreign = counts.foreign + 1
        elseif RestApiDelete('/instances/' .. instanceId) then
          counts.deleted = counts.deleted + 1
        else
          counts.failed = counts.failed + 1
        end
      end
    end
  end
  return counts
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  tags = Items(tags)
  local sopClass = Trim(tags['SOPClassUID'])
  if sopClass == '' then
    sopClass = Trim(Items(metadata)['SopClassUid'])
  end
  if sopClass ~= KOS_SOP_CLASS then
    return
  end

  if type(tags['ConceptNameCodeSequence']) ~= 'table'
    or type(tags['CurrentRequestedProcedureEvidenceSequence']) ~= 'table' then
    tags = Items(GetJson('/instances/' .. instanceId .. '/tags?simplify'))
  end

  local reason = RejectionReason(tags)
  if reason == nil then
    print('ACWI rejection: key object ' .. instanceId
          .. ' is not a rejection note (title); nothing deleted')
    return
  end
  if Trim(tags['Manufacturer']) ~= NODE_MANUFACTURER then
    print('ACWI rejection: rejection note ' .. instanceId
          .. ' is not from the node (Manufacturer); nothing deleted')
    return
  end

  local counts = ApplyRejection(instanceId, tags)
  print('ACWI rejection: note ' .. instanceId .. ' (' .. reason .. '): deleted '
        .. counts.deleted .. ' node result(s); kept ' .. counts.foreign
        .. ' of another manufacturer, ' .. counts.otherPatient .. ' of another patient; '
        .. counts.gone .. ' already gone, ' .. counts.malformed .. ' malformed reference(s), '
        .. counts.failed .. ' failed')
end

print('ACWI routing script loaded')
